#include <cstdio>
int main() { std::puts("memshuffle demo: to come"); }
