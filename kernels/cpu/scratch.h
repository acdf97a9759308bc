// Scratch memory of the CPU kernels (framework-free): per-thread arrays carved
// out of one zero-filled allocation, and shared buffers, within fixed limits.
//
// Every allocation happens before a parallel region, so no C++ exception can
// leave an OpenMP region (which would terminate the process). Sizes beyond the
// limits (e.g. expanded tensors with billions of keys) throw TooLarge, which
// the binding reports as a ValueError, instead of failing in the allocator or
// swapping. Real inputs need a few MiB per thread (a tile of query rows and one
// head's keys). Fewer threads run when the total would exceed kMaxTotalScratch;
// results never depend on the thread count.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <sstream>
#include <stdexcept>

namespace sgattn::cpu {

constexpr int64_t kMaxThreadScratch = int64_t(1) << 30;  // 1 GiB per thread
constexpr int64_t kMaxTotalScratch = int64_t(4) << 30;   // 4 GiB per call

// Sizes a kernel does not support (the message says which and why).
struct TooLarge : std::length_error {
  using std::length_error::length_error;
};
template <typename... A>
[[noreturn]] void too_large(const A&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw TooLarge(s.str());
}

// A 64-byte aligned heap array of n bytes, zero-filled when asked.
class Buffer {
 public:
  Buffer() = default;
  Buffer(int64_t bytes, bool zero)
      : p_(static_cast<char*>(::operator new(static_cast<size_t>(std::max<int64_t>(bytes, 64)), std::align_val_t(64)))) {
    if (zero) std::memset(p_, 0, static_cast<size_t>(bytes));
  }
  Buffer(Buffer&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    if (p_) ::operator delete(p_, std::align_val_t(64));
  }
  template <typename E>
  E* as() const {
    return reinterpret_cast<E*>(p_);
  }

 private:
  char* p_ = nullptr;
};

// A shared (not per-thread) buffer of a * b elements of E, zero-filled
// (uninitialised when !zero: the work items fill their own parts), within the
// total limit; `what` names it in the error.
template <typename E>
Buffer shared_buffer(int64_t a, int64_t b, const char* what, bool zero = true) {
  int64_t n = 0, nb = 0;
  if (__builtin_mul_overflow(a, b, &n) || __builtin_mul_overflow(n, static_cast<int64_t>(sizeof(E)), &nb) ||
      nb > kMaxTotalScratch)
    too_large(what, " would need ", a, " x ", b, " elements of scratch, above the cpu kernel's limit of ",
              kMaxTotalScratch >> 30, " GiB; such sizes are not supported");
  return Buffer(nb, zero);
}

// Threads that may run with `per` bytes of scratch each.
inline int threads_for(int64_t per) {
  return static_cast<int>(std::clamp<int64_t>(kMaxTotalScratch / per, 1, std::max(1, omp_get_max_threads())));
}

// Per-thread scratch arrays carved out of one zero-filled allocation.
class Scratch {
 public:
  // Reserves a * b elements of E per thread; returns the array's handle.
  template <typename E>
  int64_t reserve(int64_t a, int64_t b) {
    int64_t n = 0, nb = 0;
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &n) ||
        __builtin_mul_overflow(n, static_cast<int64_t>(sizeof(E)), &nb) || nb > kMaxThreadScratch) {
      too_big_ = true;
      return 0;
    }
    const int64_t off = bytes_;
    bytes_ += (nb + 63) / 64 * 64;
    if (bytes_ > kMaxThreadScratch) too_big_ = true;
    return off;
  }
  bool too_big() const { return too_big_; }
  // Allocates the reserved arrays (zero-filled) for the threads to run; returns their count.
  int allocate() {
    if (too_big_) throw std::logic_error("sgattn::cpu::Scratch: allocate() after too_big()");
    per_ = std::max<int64_t>(bytes_, 64);
    nthreads_ = threads_for(per_);
    buf_ = Buffer(nthreads_ * per_, true);
    return nthreads_;
  }
  // The calling thread's array (inside a parallel region of allocate()'s thread count).
  template <typename E>
  E* get(int64_t handle) const {
    return reinterpret_cast<E*>(buf_.as<char>() + static_cast<int64_t>(omp_get_thread_num()) * per_ + handle);
  }

 private:
  int64_t bytes_ = 0, per_ = 0;
  bool too_big_ = false;
  int nthreads_ = 1;
  Buffer buf_;
};

}  // namespace sgattn::cpu
