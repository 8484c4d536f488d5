#include "launch/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "launch/commands.h"

namespace brigade::launch {
namespace {

namespace fs = std::filesystem;
using Points = std::vector<std::pair<int64_t, double>>;

struct RunData {
  std::string name;
  std::string recipe;                                          // recipe.yaml, as written
  std::map<std::string, Points> scalars;                       // metric -> (step, value)
  std::map<std::string, std::vector<std::pair<int64_t, std::vector<double>>>> layers;  // per-layer lists
};

struct DistillData {
  std::string name;
  std::vector<std::pair<std::string, nlohmann::json>> stages;  // stage -> stage.json
  nlohmann::json eval;                                         // eval.json (array), or null
  std::vector<nlohmann::json> samples;                         // accepted teacher solutions
};

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string num(double v, const char* format = "%.4g") {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// metrics.jsonl of `dir` (a missing file or a bad line is a warning, never an error).
RunData load_run(const fs::path& dir, const std::string& name, std::vector<std::string>& warnings) {
  RunData run;
  run.name = name;
  if (fs::exists(dir / "recipe.yaml")) run.recipe = read_file(dir / "recipe.yaml");
  const fs::path metrics = dir / "metrics.jsonl";
  if (!fs::exists(metrics)) {
    warnings.push_back(metrics.string() + ": no such file (the run has logged nothing yet?)");
    return run;
  }
  std::ifstream in(metrics);
  int64_t line_number = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_number;
    if (line.empty()) continue;
    const auto record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (record.is_discarded() || !record.is_object() || !record.contains("step") || !record["step"].is_number_integer()) {
      warnings.push_back(metrics.string() + ":" + std::to_string(line_number) +
                         ": not a JSON object with an integer \"step\" (skipped)");
      continue;
    }
    const int64_t step = record["step"].get<int64_t>();
    for (const auto& [key, value] : record.items()) {
      if (key == "step") continue;
      if (value.is_number()) {
        run.scalars[key].emplace_back(step, value.get<double>());
      } else if (value.is_array() && !value.empty() &&
                 std::all_of(value.begin(), value.end(), [](const auto& v) { return v.is_number(); })) {
        run.layers[key].emplace_back(step, value.get<std::vector<double>>());
      }
    }
  }
  return run;
}

DistillData load_distill(const fs::path& dir, const std::string& name) {
  DistillData d;
  d.name = name;
  for (const char* stage : {"generate", "verify", "build", "train"}) {
    const fs::path file = dir / "distill" / stage / "stage.json";
    if (!fs::exists(file)) continue;
    const auto j = nlohmann::json::parse(read_file(file), nullptr, false);
    d.stages.emplace_back(stage, j.is_discarded() ? nlohmann::json("unreadable stage.json") : j);
  }
  if (fs::exists(dir / "distill" / "eval.json")) {
    const auto j = nlohmann::json::parse(read_file(dir / "distill" / "eval.json"), nullptr, false);
    if (!j.is_discarded()) d.eval = j;
  }
  const fs::path accepted = dir / "distill" / "verify" / "accepted.jsonl";
  if (fs::exists(accepted)) {
    std::ifstream in(accepted);
    for (std::string line; d.samples.size() < 3 && std::getline(in, line);) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_object()) d.samples.push_back(j);
    }
  }
  return d;
}

constexpr const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"};

// One line plot: every run with the metric, on shared axes.
std::string plot(const std::string& metric, const std::vector<RunData>& runs) {
  constexpr double W = 600, H = 250, left = 64, right = 16, top = 14, bottom = 34;
  int64_t x0 = INT64_MAX, x1 = INT64_MIN;
  double y0 = INFINITY, y1 = -INFINITY;
  for (const auto& r : runs) {
    auto it = r.scalars.find(metric);
    if (it == r.scalars.end()) continue;
    for (const auto& [s, v] : it->second) {
      if (!std::isfinite(v)) continue;
      x0 = std::min(x0, s), x1 = std::max(x1, s), y0 = std::min(y0, v), y1 = std::max(y1, v);
    }
  }
  if (x0 > x1) return "";
  if (x0 == x1) --x0, ++x1;
  if (y0 == y1) y0 -= std::max(1e-12, std::abs(y0) * 0.05), y1 += std::max(1e-12, std::abs(y1) * 0.05);
  const double pad = 0.05 * (y1 - y0);
  y0 = y0 >= 0 && y0 - pad < 0 ? 0.0 : y0 - pad;  // a non-negative series keeps a non-negative axis
  y1 += pad;
  auto px = [&](double s) { return left + (s - static_cast<double>(x0)) / static_cast<double>(x1 - x0) * (W - left - right); };
  auto py = [&](double v) { return top + (y1 - v) / (y1 - y0) * (H - top - bottom); };
  std::ostringstream o;
  o << "<figure class=\"plot\" data-metric=\"" << escape(metric) << "\"><figcaption>" << escape(metric)
    << "</figcaption>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" viewBox=\"0 0 " << W << " " << H << "\">\n";
  o << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << W - left - right << "\" height=\""
    << H - top - bottom << "\" fill=\"#fafafa\" stroke=\"#999\"/>\n";
  for (int i = 0; i <= 4; ++i) {
    const double v = y0 + (y1 - y0) * i / 4.0, s = static_cast<double>(x0) + static_cast<double>(x1 - x0) * i / 4.0;
    o << "<text class=\"tick\" x=\"" << left - 4 << "\" y=\"" << num(py(v) + 4, "%.1f") << "\" text-anchor=\"end\">"
      << num(v) << "</text>";
    o << "<text class=\"tick\" x=\"" << num(px(s), "%.1f") << "\" y=\"" << H - bottom + 14
      << "\" text-anchor=\"middle\">" << num(std::round(s), "%.0f") << "</text>\n";
  }
  o << "<text class=\"tick\" x=\"" << W - right << "\" y=\"" << H - 4 << "\" text-anchor=\"end\">step</text>\n";
  size_t index = 0;
  std::ostringstream legend;
  for (const auto& r : runs) {
    const std::string color = kColors[index++ % std::size(kColors)];
    auto it = r.scalars.find(metric);
    if (it == r.scalars.end()) continue;
    std::ostringstream points;
    int64_t n = 0;
    for (const auto& [s, v] : it->second) {
      if (!std::isfinite(v)) continue;
      points << (n++ ? " " : "") << num(px(static_cast<double>(s)), "%.1f") << "," << num(py(v), "%.1f");
    }
    o << "<polyline class=\"series\" data-run=\"" << escape(r.name) << "\" data-points=\"" << n << "\" points=\""
      << points.str() << "\" fill=\"none\" stroke=\"" << color << "\" stroke-width=\"1.5\"/>\n";
    legend << "<span class=\"key\" style=\"color:" << color << "\">&#9632; " << escape(r.name) << "</span> ";
  }
  o << "</svg><div class=\"legend\">" << legend.str() << "</div></figure>\n";
  return o.str();
}

// Per-layer values (1 = balanced) as colour over layers x logged steps.
std::string heatmap(const RunData& run, const std::string& metric) {
  const auto& rows = run.layers.at(metric);
  size_t layers = 0;
  double top = 1.0;
  for (const auto& [s, v] : rows) {
    layers = std::max(layers, v.size());
    for (double x : v) top = std::max(top, std::isfinite(x) ? x : top);
  }
  const double cell = std::clamp(600.0 / static_cast<double>(rows.size()), 2.0, 24.0), h = 16, label = 56;
  const double W = label + cell * static_cast<double>(rows.size()) + 8, H = h * static_cast<double>(layers) + 24;
  std::ostringstream o;
  o << "<figure class=\"heat\"><figcaption>" << escape(metric) << " per layer: " << escape(run.name)
    << " (white 1 = balanced, red " << num(top) << ")</figcaption>\n<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"heatmap\" data-run=\""
    << escape(run.name) << "\" data-metric=\"" << escape(metric) << "\" data-layers=\"" << layers
    << "\" data-steps=\"" << rows.size() << "\" width=\"" << W << "\" height=\"" << H << "\">\n";
  for (size_t l = 0; l < layers; ++l)
    o << "<text class=\"tick\" x=\"" << label - 4 << "\" y=\"" << h * static_cast<double>(l) + 12
      << "\" text-anchor=\"end\">MoE " << l << "</text>\n";
  for (size_t c = 0; c < rows.size(); ++c) {
    const auto& [step, values] = rows[c];
    for (size_t l = 0; l < values.size(); ++l) {
      const double t = top > 1.0 ? std::clamp((values[l] - 1.0) / (top - 1.0), 0.0, 1.0) : 0.0;
      char fill[16];
      std::snprintf(fill, sizeof fill, "#%02x%02x%02x", 255 - static_cast<int>(63 * t), 255 - static_cast<int>(198 * t),
                    255 - static_cast<int>(212 * t));
      o << "<rect x=\"" << num(label + cell * static_cast<double>(c), "%.1f") << "\" y=\"" << h * static_cast<double>(l)
        << "\" width=\"" << num(cell, "%.1f") << "\" height=\"" << h << "\" fill=\"" << fill << "\"><title>step "
        << step << ", layer " << l << ": " << num(values[l]) << "</title></rect>\n";
    }
  }
  o << "<text class=\"tick\" x=\"" << label << "\" y=\"" << H - 6 << "\">steps " << rows.front().first << " to "
    << rows.back().first << "</text>\n</svg></figure>\n";
  return o.str();
}

std::string distill_section(const DistillData& d) {
  std::ostringstream o;
  o << "<section class=\"distill\"><h2>Distillation: " << escape(d.name) << "</h2>\n";
  o << "<table class=\"stages\"><tr><th>stage</th><th>result</th></tr>\n";
  for (const auto& [stage, j] : d.stages) {
    auto shown = j;
    if (shown.is_object()) shown.erase("inputs");
    o << "<tr><td>" << stage << "</td><td><code>" << escape(shown.dump()) << "</code></td></tr>\n";
  }
  o << "</table>\n";
  if (d.eval.is_array()) {
    o << "<table class=\"eval\"><tr><th>model</th><th>parameters</th><th>pass@1</th><th>pass@k</th><th>problems</th></tr>\n";
    for (const auto& row : d.eval) {
      o << "<tr><td>" << escape(row.value("model", std::string("?"))) << "</td><td>"
        << num(row.value("parameters", 0.0), "%.0f") << "</td><td>" << num(100.0 * row.value("pass@1", 0.0), "%.1f")
        << "%</td><td>" << num(100.0 * row.value("pass@k", 0.0), "%.1f") << "% (k = " << row.value("k", 0) << ")</td><td>"
        << row.value("problems", 0) << "</td></tr>\n";
    }
    o << "</table>\n";
  }
  for (const auto& s : d.samples) {
    o << "<details class=\"sample\"><summary>teacher solution " << escape(s.value("prompt_id", std::string("?")))
      << "</summary><pre>" << escape(s.value("prompt", std::string())) << escape(s.value("completion", std::string()))
      << "</pre></details>\n";
  }
  o << "</section>\n";
  return o.str();
}

}  // namespace

ReportResult render_report(const std::vector<fs::path>& paths) {
  BRIGADE_CHECK(!paths.empty(), "report: name at least one run directory");
  ReportResult result;
  std::vector<RunData> runs;
  std::vector<DistillData> distills;
  for (const auto& p : paths) {
    BRIGADE_CHECK(fs::is_directory(p), "report: ", p.string(), " is not a run directory");
    const std::string name = p.filename().empty() ? p.parent_path().filename().string() : p.filename().string();
    if (fs::is_directory(p / "distill") && !fs::exists(p / "metrics.jsonl")) {
      distills.push_back(load_distill(p, name));
      if (fs::is_directory(p / "teacher")) runs.push_back(load_run(p / "teacher", name + "/teacher", result.warnings));
      if (fs::is_directory(p / "distill" / "train" / "run"))
        runs.push_back(load_run(p / "distill" / "train" / "run", name + "/student", result.warnings));
    } else {
      runs.push_back(load_run(p, name, result.warnings));
    }
  }
  // Metrics in a familiar order first, then whatever else the runs log.
  const std::vector<std::string> preferred = {"loss", "eval_loss", "mtp_loss", "kd_loss", "lr", "grad_norm",
                                              "tokens_per_sec", "eval_ppl"};
  std::vector<std::string> metrics;
  std::set<std::string> all;
  for (const auto& r : runs)
    for (const auto& [k, v] : r.scalars) all.insert(k);
  for (const auto& m : preferred)
    if (all.contains(m)) metrics.push_back(m);
  for (const auto& m : all)
    if (std::find(metrics.begin(), metrics.end(), m) == metrics.end()) metrics.push_back(m);

  std::ostringstream o;
  o << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>brigade report</title>\n"
       "<style>body{font-family:sans-serif;margin:24px;color:#222}figure{display:inline-block;margin:8px;vertical-align:top}"
       "figcaption{font-weight:bold;margin-bottom:4px}.tick{font-size:11px;fill:#555}.legend{font-size:13px}"
       ".key{margin-right:12px}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:left;font-size:13px}pre{background:#f4f4f4;padding:8px;font-size:12px;overflow:auto}"
       ".warning{color:#a40}</style></head><body>\n<h1>brigade report</h1>\n";
  o << "<p>Runs: ";
  for (size_t i = 0; i < runs.size(); ++i) o << (i ? ", " : "") << "<b>" << escape(runs[i].name) << "</b>";
  o << "</p>\n";
  if (!result.warnings.empty()) {
    o << "<ul class=\"warnings\">\n";
    for (const auto& w : result.warnings) o << "<li class=\"warning\">" << escape(w) << "</li>\n";
    o << "</ul>\n";
  }
  for (const auto& d : distills) o << distill_section(d);
  o << "<section class=\"curves\"><h2>Curves</h2>\n";
  if (metrics.empty()) o << "<p>No metrics to plot.</p>\n";
  for (const auto& m : metrics) o << plot(m, runs);
  o << "</section>\n";
  bool any_layers = false;
  for (const auto& r : runs) any_layers = any_layers || !r.layers.empty();
  if (any_layers) {
    o << "<section class=\"balance\"><h2>Per layer</h2>\n";
    for (const auto& r : runs)
      for (const auto& [metric, rows] : r.layers) o << heatmap(r, metric);
    o << "</section>\n";
  }
  o << "<section class=\"recipes\"><h2>Recipes</h2>\n";
  for (const auto& r : runs) {
    if (r.recipe.empty()) continue;
    o << "<details><summary>" << escape(r.name) << "</summary><pre>" << escape(r.recipe) << "</pre></details>\n";
  }
  o << "</section>\n</body></html>\n";
  result.html = o.str();
  return result;
}

int report_command(const ReportArgs& args) {
  const ReportResult report = render_report(args.runs);
  for (const auto& w : report.warnings) std::cerr << "report: " << w << "\n";
  if (!args.out.parent_path().empty()) fs::create_directories(args.out.parent_path());
  write_file_atomic(args.out, report.html);
  std::cout << "report: " << fs::absolute(args.out).string() << "\n";
  return 0;
}

}  // namespace brigade::launch
