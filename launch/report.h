// `brigade report RUN [RUN...] --out report.html`: one self-contained HTML page
// (inline SVG, no scripts, nothing fetched) for training and distillation runs.
//
// Per run: its effective recipe (recipe.yaml), and for a distillation run the stage
// table (each RUN/distill/<stage>/stage.json), teacher/student pass@k (eval.json)
// and a few accepted teacher solutions. Plots overlay every run that has the series
// (one <polyline> per run, legend by run name): the training scalars of
// metrics.jsonl (loss, lr, grad_norm, tokens_per_sec, mtp_loss, kd_loss, ... any
// number the runs log) and eval_loss; per-layer lists (the MoE balance
// moe_load_max_over_mean) become a heat map per run, layers by logged steps. Two
// runs that differ only in precision (FP8 against BF16) are simply overlaid.
//
// A distillation run contributes its teacher (RUN/teacher) and student
// (RUN/distill/train/run) as two runs named RUN/teacher and RUN/student.
//
// The DOM is stable for tests: <figure class="plot" data-metric="M"> holding an
// <svg> with one <polyline class="series" data-run="R" data-points="N">, and
// <svg class="heatmap" data-run="R" data-metric="M" data-layers="L" data-steps="S">.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace brigade::launch {

struct ReportResult {
  std::string html;
  // Problems found, each naming the file (and line): a run without metrics.jsonl, a
  // line that is not a JSON object. The page shows them too; nothing stops on them.
  std::vector<std::string> warnings;
};

// The page for `runs`; a path that does not exist is an Error naming it.
ReportResult render_report(const std::vector<std::filesystem::path>& runs);

struct ReportArgs {
  std::vector<std::filesystem::path> runs;
  std::filesystem::path out = "report.html";
};
int report_command(const ReportArgs& args);

}  // namespace brigade::launch
