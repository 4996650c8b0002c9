// One arena per worker, reset between requests: after the first few requests the
// arena has grown to the size of a request and no request calls malloc any more.
// arena_scope gives a part of a request its own scratch space, rewound when it ends.
#include <memshuffle/arena_resource.hpp>
#include <memshuffle/tracking_resource.hpp>

#include <cstdio>
#include <map>
#include <memory_resource>
#include <string>
#include <vector>

// A request's work: parse "key=value" pairs into containers that live in the arena.
std::size_t handle_request(int id, std::pmr::memory_resource* arena) {
  std::pmr::map<std::pmr::string, std::pmr::string> fields(arena);
  for (int i = 0; i < 200 + id % 50; ++i)
    fields.emplace(std::pmr::string("field-" + std::to_string(i), arena),
                   std::pmr::string(64, 'x', arena));
  return fields.size();
}

int main() {
  memshuffle::tracking_resource heap(std::pmr::new_delete_resource());  // counts what reaches malloc
  memshuffle::arena_resource arena(&heap);

  for (int request = 1; request <= 1000; ++request) {
    handle_request(request, &arena);
    {
      memshuffle::arena_scope scratch(arena);  // a temporary buffer for this step only
      std::pmr::vector<char> buffer(4096, '\0', &arena);
    }
    if (request == 1 || request == 100 || request == 1000)
      std::printf("after request %4d: %zu upstream allocations in all, %zu bytes held\n", request,
                  heap.stats().total_allocations, heap.stats().current_bytes);
    arena.reset();  // everything of this request is gone at once; the chunks stay
  }
}
