// Small deterministic hashing helpers. Used where a value must depend only on its
// inputs (the sampler's batch at step k, recipe fingerprints), never on process state.
#pragma once

#include <cstdint>
#include <string_view>

namespace brigade {

// SplitMix64 finaliser: a fast, well-mixed 64-bit bijection.
constexpr uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Combines values into one hash, order-sensitive.
constexpr uint64_t hash_combine(uint64_t seed, uint64_t value) { return mix64(seed ^ mix64(value)); }

// FNV-1a over bytes; stable across platforms and runs.
constexpr uint64_t fnv1a(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace brigade
