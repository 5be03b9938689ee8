// Buffers for the large outputs of the CPU ops, kept for reuse instead of going back to malloc.
//
// glibc returns large freed blocks to the kernel (munmap above the mmap threshold, heap trimming
// below it), so the next training step's outputs of the same sizes start on fresh pages: one page
// fault per 4 KiB, paid inside the ops (benchmarks/results/..._profile_resnet50_b8_160_fp32_at_7bf50de.txt
// counts the faults per step with and without this pool). A training loop asks for the same sizes
// every step, so a freed output is kept, keyed by its size, and handed to the next request of that
// size: its pages stay mapped. Idle buffers are capped at RESNET_FAST_CPU_POOL_MB (default 2048; 0
// turns the pool off), least recently freed first out; _cpu_output_pool_release frees them all.
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdlib>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <vector>

namespace resnet_fast::cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;    // smaller outputs: malloc reuses its heap well
constexpr size_t kGranule = size_t(64) << 10;    // sizes rounded up to this share buffers
constexpr size_t kDefaultCapMb = 2048;

size_t idle_cap_bytes() {
  const char* env = std::getenv("RESNET_FAST_CPU_POOL_MB");
  if (env == nullptr || *env == '\0') return kDefaultCapMb << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(*end == '\0' && mb >= 0 && mb < (1LL << 40),
              "RESNET_FAST_CPU_POOL_MB must be a whole number of MiB >= 0 (0 turns the CPU output pool off), got '",
              env, "'");
  return static_cast<size_t>(mb) << 20;
}

class OutputPool final : public c10::Allocator {
 public:
  explicit OutputPool(size_t cap) : cap_(cap) {}
  size_t cap() const { return cap_; }

  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = (nbytes + kGranule - 1) / kGranule * kGranule;
    void* data = take(size);
    if (data == nullptr) data = c10::alloc_cpu(size);
    return {data, new Block{data, size}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void release_all() {
    std::list<Block> idle;
    {
      std::lock_guard<std::mutex> lock(mu_);
      idle.swap(lru_);
      by_size_.clear();
      idle_bytes_ = 0;
    }
    for (const Block& b : idle) c10::free_cpu(b.data);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(lru_.size()), static_cast<int64_t>(idle_bytes_), reused_, fresh_,
            static_cast<int64_t>(cap_)};
  }

 private:
  struct Block {
    void* data;
    size_t size;
  };

  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    // The most recently freed buffer of this size (equal keys keep insertion order): the likeliest
    // to still be in cache, which its next writer then hits instead of memory.
    const auto [first, last] = by_size_.equal_range(size);
    if (first == last) {
      ++fresh_;
      return nullptr;
    }
    const auto it = std::prev(last);
    void* data = it->second->data;
    lru_.erase(it->second);
    by_size_.erase(it);
    idle_bytes_ -= size;
    ++reused_;
    return data;
  }

  void keep(Block b) {
    std::list<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      lru_.push_front(b);
      by_size_.emplace(b.size, lru_.begin());
      idle_bytes_ += b.size;
      while (idle_bytes_ > cap_) {
        auto last = std::prev(lru_.end());
        for (auto it = by_size_.lower_bound(last->size); it != by_size_.end(); ++it) {
          if (it->second == last) {
            by_size_.erase(it);
            break;
          }
        }
        idle_bytes_ -= last->size;
        evicted.splice(evicted.begin(), lru_, last);
      }
    }
    for (const Block& e : evicted) c10::free_cpu(e.data);
  }

  static void give_back(void* ctx);

  const size_t cap_;
  std::mutex mu_;
  std::list<Block> lru_;                                      // most recently freed first
  std::multimap<size_t, std::list<Block>::iterator> by_size_;
  size_t idle_bytes_ = 0;
  int64_t reused_ = 0, fresh_ = 0;
};

OutputPool& pool() {
  static auto* p = new OutputPool(idle_cap_bytes());  // never destroyed: deleters may run at exit
  return *p;
}

void OutputPool::give_back(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  pool().keep(*b);
  delete b;
}

void release() { pool().release_all(); }

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat fmt) {
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
  if (bytes < kMinBytes || pool().cap() == 0) return at::empty(sizes, at::TensorOptions().dtype(dtype).memory_format(fmt));
  return at::detail::empty_generic(sizes, &pool(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, fmt);
}

TORCH_LIBRARY_FRAGMENT(resnet_fast, m) {
  // [idle buffers, idle bytes, requests served by a kept buffer, requests that allocated, idle cap in bytes]
  m.def("_cpu_output_pool_stats() -> int[]", [] { return pool().stats(); });
  m.def("_cpu_output_pool_release() -> ()", &release);
}

}  // namespace resnet_fast::cpu
