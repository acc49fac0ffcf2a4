// A caching allocator for the large CPU outputs of batchnorm.torch's native extension
// (included by lean.cpp; batchnorm/adapters/torch/native.py documents it).
//
// torch's CPU allocator returns every large block to the system on free (glibc maps blocks
// above its mmap threshold, at most 32 MiB, afresh each time), so a new output of a large
// batch is paid for again in page faults on its first write: on the project's virtual
// machine about 0.2 ms per MiB, more than the batch-norm pass itself. This pool keeps freed
// output blocks (from MIN_BYTES up, exact sizes, at most `limit` bytes in all, the oldest
// evicted first to make room) and hands them out again. Allocations are reported to
// torch's profiler as torch's CPU allocator reports them.
//
// Blocks come from c10::alloc_cpu (torch's aligned allocation) and go back to
// c10::free_cpu; the pool is never destroyed (tensors may be freed during the
// interpreter's teardown), and a forked child starts with a fresh lock.
#pragma once

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <iterator>
#include <list>
#include <mutex>
#include <new>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace bnpool {

constexpr size_t MIN_BYTES = size_t(1) << 20;  // smaller blocks stay on glibc's heap

struct State {
  std::mutex lock;
  // freed blocks, oldest first, and per size the positions of its blocks in that order
  std::list<std::pair<size_t, void*>> order;
  std::unordered_map<size_t, std::vector<std::list<std::pair<size_t, void*>>::iterator>> idle;
  std::unordered_map<void*, size_t> live;  // handed-out block -> size
  size_t cached = 0;                       // bytes in `idle`
  size_t in_use = 0;                       // bytes handed out
  std::atomic<size_t> limit{0};            // 0: the pool is off
  int64_t hits = 0, misses = 0;
};

inline State& state() {
  static State* s = [] {
    State* p = new State();  // never freed (see above)
    // a fork waits for the lock, so the child's maps are whole; the child unlocks its copy
    pthread_atfork([] { state().lock.lock(); }, [] { state().lock.unlock(); },
                   [] { new (&state().lock) std::mutex(); });
    return p;
  }();
  return *s;
}

// Takes the oldest cached block out of the cache (the lock held); nullptr if none.
inline void* evict_oldest(State& s) {
  if (s.order.empty()) return nullptr;
  auto [n, p] = s.order.front();
  std::vector<std::list<std::pair<size_t, void*>>::iterator>& v = s.idle[n];
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] == s.order.begin()) {
      v.erase(v.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  if (v.empty()) s.idle.erase(n);
  s.order.pop_front();
  s.cached -= n;
  return p;
}

// Frees the oldest blocks (outside the lock) until at most `keep` bytes stay cached.
// (The lock is never held while calling into torch or Python, except the profiler's
// report, which calls nothing of ours.)
inline size_t trim(size_t keep) {
  State& s = state();
  std::vector<std::pair<size_t, void*>> drop;
  {
    std::lock_guard<std::mutex> g(s.lock);
    while (s.cached > keep) {
      size_t n = s.order.front().first;
      drop.emplace_back(n, evict_oldest(s));
    }
  }
  size_t freed = 0;
  for (auto& [n, p] : drop) {
    c10::free_cpu(p);
    freed += n;
  }
  return freed;
}

// Returns a freed block to the cache (evicting the oldest blocks to make room), or to the
// system when it is smaller than MIN_BYTES or larger than the limit.
inline void release(void* ptr) {
  State& s = state();
  std::vector<void*> drop;
  size_t n = 0;
  bool keep = false;
  {
    std::lock_guard<std::mutex> g(s.lock);
    auto it = s.live.find(ptr);
    if (it != s.live.end()) {
      n = it->second;
      s.live.erase(it);
      s.in_use -= n;
      keep = n >= MIN_BYTES && n <= s.limit;
      while (keep && s.cached + n > s.limit) drop.push_back(evict_oldest(s));
      if (keep) {
        s.order.emplace_back(n, ptr);
        s.idle[n].push_back(std::prev(s.order.end()));
        s.cached += n;
      }
    }
    if (n > 0)
      c10::reportMemoryUsageToProfiler(ptr, -static_cast<int64_t>(n), s.in_use,
                                       s.in_use + s.cached, c10::Device(c10::DeviceType::CPU));
  }
  for (void* p : drop) c10::free_cpu(p);
  if (!keep) c10::free_cpu(ptr);
}

struct Allocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    State& s = state();
    void* p = nullptr;
    if (n >= MIN_BYTES) {
      std::lock_guard<std::mutex> g(s.lock);
      auto it = s.idle.find(n);
      if (it != s.idle.end()) {
        auto pos = it->second.back();
        p = pos->second;
        it->second.pop_back();
        if (it->second.empty()) s.idle.erase(it);
        s.order.erase(pos);
        s.cached -= n;
        ++s.hits;
      } else {
        ++s.misses;
      }
    }
    if (p == nullptr) p = c10::alloc_cpu(n);  // (throws on failure, nothing recorded)
    if (p != nullptr) {
      std::lock_guard<std::mutex> g(s.lock);
      s.live[p] = n;
      s.in_use += n;
      c10::reportMemoryUsageToProfiler(p, static_cast<int64_t>(n), s.in_use,
                                       s.in_use + s.cached, c10::Device(c10::DeviceType::CPU));
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

inline Allocator* allocator() {
  static Allocator* a = new Allocator();
  return a;
}

// A new tensor with x's sizes and strides (x dense: what at::empty_like(x) gives) of
// `dtype`, from the pool when it is on and the block is large enough.
inline at::Tensor empty_like(const at::Tensor& x, at::ScalarType dtype) {
  size_t n = static_cast<size_t>(x.numel()) * c10::elementSize(dtype);
  if (n < MIN_BYTES || state().limit == 0) return at::empty_like(x, x.options().dtype(dtype));
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), allocator(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
}

inline at::Tensor empty_like(const at::Tensor& x) { return empty_like(x, x.scalar_type()); }

// A new tensor of x's sizes in memory format `fmt` (at::empty_like(x, fmt)), pooled as above.
inline at::Tensor empty_format(const at::Tensor& x, at::MemoryFormat fmt) {
  size_t n = static_cast<size_t>(x.numel()) * x.element_size();
  if (n < MIN_BYTES || state().limit == 0) return at::empty_like(x, fmt);
  return at::detail::empty_generic(x.sizes(), allocator(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   x.scalar_type(), fmt);
}

// torch.empty_like(x, dtype=dtype, memory_format=fmt) for the Python route: pooled for a
// large dense CPU x, else torch's own.
inline at::Tensor empty_pooled(const at::Tensor& x, at::ScalarType dtype, at::MemoryFormat fmt) {
  size_t n = static_cast<size_t>(x.numel()) * c10::elementSize(dtype);
  bool plain = x.device().is_cpu() && x.layout() == at::kStrided && !x.is_neg() &&
               !x.is_conj() && n >= MIN_BYTES && state().limit > 0;
  if (!plain) return at::empty_like(x, x.options().dtype(dtype), fmt);
  if (fmt == at::MemoryFormat::Preserve) {
    if (!x.is_non_overlapping_and_dense()) return at::empty_like(x, x.options().dtype(dtype), fmt);
    return at::detail::empty_strided_generic(x.sizes(), x.strides(), allocator(),
                                             c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
  }
  return at::detail::empty_generic(x.sizes(), allocator(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, fmt);
}

// Sets the byte limit (0: off; cached blocks above it are freed); returns the old one.
inline int64_t set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "batchnorm native pool: the limit must be >= 0 bytes, got ", bytes);
  size_t old;
  {
    std::lock_guard<std::mutex> g(state().lock);
    old = state().limit.exchange(static_cast<size_t>(bytes));
  }
  trim(static_cast<size_t>(bytes));
  return static_cast<int64_t>(old);
}

// (cached bytes, cached blocks, blocks handed out now, hits, misses, limit)
inline std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t> stats() {
  State& s = state();
  std::lock_guard<std::mutex> g(s.lock);
  int64_t blocks = 0;
  for (auto& kv : s.idle) blocks += static_cast<int64_t>(kv.second.size());
  return {static_cast<int64_t>(s.cached), blocks, static_cast<int64_t>(s.live.size()),
          s.hits, s.misses, static_cast<int64_t>(s.limit.load())};
}

}  // namespace bnpool
