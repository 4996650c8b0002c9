#pragma once
// Our goals are ratios between benchmarks of one run (ours against memcpy, std, a
// fixed budget), which Google Benchmark does not print. This reporter keeps every
// run's time and counters, shows the usual table, and then a table of goals.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <unistd.h>

namespace memshuffle::bench {

// Removes --name=VALUE (a flag of ours, not Google Benchmark's) from the arguments and
// returns VALUE, or "" when absent. Call before benchmark::Initialize.
inline std::string take_flag(int& argc, char** argv, const std::string& name) {
  const std::string prefix = "--" + name + "=";
  std::string value;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0)
      value = argv[i] + prefix.size();
    else
      argv[kept++] = argv[i];
  }
  argc = kept;
  return value;
}

class goal_reporter : public benchmark::ConsoleReporter {
 public:
  // Honours --benchmark_counters_tabular, which is lost when main() supplies the
  // display reporter; call before benchmark::Initialize consumes the flags.
  static OutputOptions options_from(int argc, char** argv) {
    int o = isatty(STDOUT_FILENO) ? OO_Color : OO_None;
    for (int i = 1; i < argc; ++i)
      if (!std::strcmp(argv[i], "--benchmark_counters_tabular") ||
          !std::strcmp(argv[i], "--benchmark_counters_tabular=true"))
        o |= OO_Tabular;
    return static_cast<OutputOptions>(o);
  }

  explicit goal_reporter(OutputOptions o) : ConsoleReporter(o) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    // With repetitions, the median stands for the benchmark.
    for (const auto& r : runs)
      if (!r.error_occurred && (r.run_type == Run::RT_Iteration || r.aggregate_name == "median"))
        runs_[r.run_name.function_name + (r.run_name.args.empty() ? "" : "/" + r.run_name.args)] = r;
    ConsoleReporter::ReportRuns(runs);
  }

  // CPU time per iteration in nanoseconds, if the benchmark ran. CPU time, as for
  // Google Benchmark's rates: the machine is shared, and waiting for a core is not
  // a cost of the code measured.
  std::optional<double> ns(const std::string& name) const {
    auto it = runs_.find(name);
    if (it == runs_.end()) return std::nullopt;
    const Run& r = it->second;
    return r.GetAdjustedCPUTime() / benchmark::GetTimeUnitMultiplier(r.time_unit) * 1e9;
  }

  std::optional<double> counter(const std::string& name, const std::string& key) const {
    auto it = runs_.find(name);
    if (it == runs_.end()) return std::nullopt;
    auto c = it->second.counters.find(key);
    if (c == it->second.counters.end()) return std::nullopt;
    return c->second.value;
  }

 private:
  std::map<std::string, Run> runs_;
};

// One line of the goal table: what was measured, the figure, and the goal, met or
// missed (no goal: a figure shown for comparison). A benchmark that did not run
// (filtered out) gives no line.
struct goal {
  double bound;
  bool at_most;
};

inline void print_goal(const char* what, std::optional<double> value, const char* unit,
                       std::optional<goal> g = std::nullopt) {
  if (!value) return;
  std::printf("  %-46s %10.3f %-3s", what, *value, unit);
  if (g) {
    bool met = g->at_most ? *value <= g->bound : *value >= g->bound;
    std::printf("  goal %s %-6g %s", g->at_most ? "<=" : ">=", g->bound, met ? "met" : "MISSED");
  }
  std::printf("\n");
}

inline std::optional<double> ratio(std::optional<double> a, std::optional<double> b) {
  if (!a || !b || *b == 0) return std::nullopt;
  return *a / *b;
}

}  // namespace memshuffle::bench
