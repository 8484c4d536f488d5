// brigade report: two training runs overlaid (FP8 against full precision), a
// damaged metrics.jsonl and a run that logged nothing; the page is self-contained,
// and headless Chromium (Debian's chromium; skipped where absent) renders it with
// the plots holding one series per run and one point per logged step.
#include <gtest/gtest.h>

#include <fstream>
#include <regex>

#include "core/fs.h"
#include "tests/testing.h"

namespace brigade {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

int64_t count(const std::string& text, const std::string& needle) {
  int64_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

// The data-points of each series in the plot of `metric`, in order.
std::vector<int64_t> series_points(const std::string& html, const std::string& metric) {
  const auto start = html.find("data-metric=\"" + metric + "\"");
  if (start == std::string::npos) return {};
  const auto end = html.find("</figure>", start);
  const std::string figure = html.substr(start, end - start);
  std::vector<int64_t> out;
  const std::regex series(R"re(class="series" data-run="[^"]*" data-points="(\d+)")re");
  for (std::sregex_iterator it(figure.begin(), figure.end(), series), stop; it != stop; ++it)
    out.push_back(std::stoll((*it)[1].str()));
  return out;
}

TEST(CliReport, OverlaysRunsReportsBadInputAndRendersInChromium) {
  TempDir dir;
  const std::string recipe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-moe.yaml";
  const std::string shrink =
      " --set model.d_model=32 --set model.n_layers=3 --set model.d_ff=64 --set model.max_seq_len=64"
      " --set model.moe.expert_d_ff=16 --set data.seq_len=32 --set data.synthetic.num_problems=200"
      " --set data.synthetic.eval_problems=20 --set trainer.max_steps=30 --set trainer.warmup_steps=2"
      " --set trainer.micro_batch_size=2 --set trainer.log_every=3 --set trainer.eval_every=10";
  for (const char* run : {"fp8", "fp32"}) {
    const std::string fp8 = std::string(run) == "fp8" ? " --set precision.fp8_recipe=blockwise" : "";
    auto r = testing::run_brigade("train " + recipe + shrink + fp8 + " --run-dir " + (dir / run).string());
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  // A torn line in the middle of one run's metrics, and a run with no metrics at all.
  std::vector<std::string> lines;
  {
    std::ifstream in(dir / "fp32" / "metrics.jsonl");
    for (std::string l; std::getline(in, l);) lines.push_back(l);
  }
  ASSERT_GT(lines.size(), 6u);
  lines.insert(lines.begin() + 4, "{\"step\": 13, \"loss\": 0.");
  std::string text;
  for (const auto& l : lines) text += l + "\n";
  write_file_atomic(dir / "fp32" / "metrics.jsonl", text);
  fs::create_directories(dir / "empty");

  const fs::path page = dir / "out" / "report.html";
  auto r = testing::run_brigade("report " + (dir / "fp8").string() + " " + (dir / "fp32").string() + " " +
                                (dir / "empty").string() + " --out " + page.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("fp32/metrics.jsonl:5: not a JSON object"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("empty/metrics.jsonl: no such file"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("report: " + fs::absolute(page).string()), std::string::npos) << r.output;
  const std::string html = read_file(page);

  // Self-contained: nothing to fetch, nothing to run.
  EXPECT_EQ(count(html, "<script"), 0);
  EXPECT_EQ(count(html, "src="), 0);
  EXPECT_EQ(count(html, "href="), 0);
  EXPECT_NE(html.find("fp32/metrics.jsonl:5"), std::string::npos) << "the page names the bad line too";

  // 30 steps logged every 3: 10 training points per run, 3 eval points per run.
  const auto loss = series_points(html, "loss"), eval = series_points(html, "eval_loss");
  EXPECT_EQ(loss, (std::vector<int64_t>{10, 10}));
  EXPECT_EQ(eval, (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(count(html, "class=\"heatmap\""), 2);  // the MoE balance of both runs
  EXPECT_NE(html.find("data-layers=\"2\" data-steps=\"10\""), std::string::npos);  // 2 MoE layers x 10 logged steps

  // As a person opens it: headless Chromium parses and renders it.
  const bool chromium = testing::run_command("command -v chromium >/dev/null 2>&1").exit_code == 0;
  if (!chromium) GTEST_SKIP() << "chromium is not installed (Debian package chromium): the page was not rendered";
  const std::string flags = " --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --enable-logging=stderr --v=0 ";
  auto dom = testing::run_command("chromium" + flags + "--dump-dom file://" + page.string() + " 2>" +
                                  (dir / "chromium.log").string());
  ASSERT_EQ(dom.exit_code, 0) << read_file(dir / "chromium.log");
  EXPECT_EQ(series_points(dom.output, "loss"), loss) << "the rendered DOM lost series or points";
  EXPECT_EQ(count(dom.output, "<polyline class=\"series\""), count(html, "<polyline class=\"series\""));
  EXPECT_EQ(count(dom.output, "class=\"heatmap\""), 2);
  const std::string log = read_file(dir / "chromium.log");
  EXPECT_EQ(log.find("Uncaught"), std::string::npos) << log;
  EXPECT_EQ(log.find("CONSOLE"), std::string::npos) << log;
  auto shot = testing::run_command("chromium" + flags + "--window-size=1300,1800 --screenshot=" +
                                   (dir / "shot.png").string() + " file://" + page.string() + " 2>/dev/null");
  ASSERT_EQ(shot.exit_code, 0) << shot.output;
  EXPECT_GT(fs::file_size(dir / "shot.png"), 10000u);
}

}  // namespace
}  // namespace brigade
