// Keeping secrets (API tokens) in a shuffler: each is ciphertext in memory except
// while a lease on it is open, authenticated (a changed byte is refused), and moves
// to a new address whenever it is returned.
#include <memshuffle/shuffler.hpp>

#include <array>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>

struct token {
  std::array<char, 64> text;
};

class secret_store {
 public:
  void put(const std::string& name, const char* value) {
    memshuffle::sealed<token> entry(shuffler_);
    auto lease = entry.open();
    std::strncpy(lease->text.data(), value, lease->text.size() - 1);
    lease.reset();  // encrypted again from here on
    entries_.insert_or_assign(name, std::move(entry));
  }

  // The plaintext exists only while use() runs.
  template <class Use>
  void with(const std::string& name, Use use) const {
    auto lease = entries_.at(name).open();
    use(lease->text.data());
  }

 private:
  memshuffle::shuffler shuffler_{{.cipher = memshuffle::cipher_kind::aes_256_gcm,
                                  .shuffle_on_return = true}};
  std::map<std::string, memshuffle::sealed<token>> entries_;  // after shuffler_: dies first
};

int main() {
  secret_store store;
  store.put("github", "ghp_example0123456789");
  store.put("pager", "pd_example_abcdef");
  store.with("github", [](const char* t) { std::printf("github token starts with %.4s...\n", t); });
  store.with("pager", [](const char* t) { std::printf("pager token is %zu characters\n", std::strlen(t)); });
}
