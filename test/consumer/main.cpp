// A user's program built against an installed memshuffle.
#include <memshuffle/memshuffle.hpp>

#include <cstdio>
#include <memory_resource>
#include <vector>

int main() {
  memshuffle::tracking_resource tracker;
  {
    memshuffle::arena_resource arena(&tracker);
    std::pmr::vector<int> v(&arena);
    for (int i = 0; i < 1000; ++i) v.push_back(i);
    if (v[999] != 999) return 1;
  }
  if (tracker.has_leaks()) return 2;
  std::puts("consumer ok");
  return 0;
}
