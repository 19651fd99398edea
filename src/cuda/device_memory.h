// Device memory: a caching allocator (freed blocks are kept per size class and reused, so a
// training step allocates nothing from the driver after the first) and DeviceBuffer<T>, a typed
// RAII handle on one allocation. All allocations of the process go through one allocator.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

namespace moeforge::cuda {

class DeviceAllocator {
 public:
  static DeviceAllocator& instance();

  // At least `bytes` bytes (rounded up to its size class, 256-byte aligned); never null for
  // bytes > 0. Throws moeforge::Error naming the request and the memory in use when the device is
  // out of memory (after releasing the cache and retrying once).
  void* allocate(size_t bytes);
  void deallocate(void* ptr);
  // Returns cached blocks to the driver.
  void release_cache();

  // While a hold is open, deallocate() puts the blocks it is given into *held instead of the free
  // lists, where they stay in use until the holder deallocates them again: a CUDA graph being
  // captured keeps the memory its kernels use, whatever the code that enqueued them freed
  // (cuda/stream_graph.h). One hold at a time, for the whole process.
  void begin_hold(std::vector<void*>* held);
  void end_hold();

  size_t bytes_in_use() const;       // handed out now
  size_t peak_bytes_in_use() const;  // since the last reset_peak
  size_t bytes_reserved() const;     // in use + cached
  void reset_peak();

 private:
  DeviceAllocator() = default;
  static size_t size_class(size_t bytes);

  mutable std::mutex mutex_;
  std::multimap<size_t, void*> free_blocks_;  // size class -> block
  std::map<void*, size_t> live_blocks_;       // block -> size class
  std::vector<void*>* held_ = nullptr;        // the open hold's blocks, or null
  size_t in_use_ = 0, peak_ = 0, reserved_ = 0;
};

// Owns count elements of T on the current device (uninitialised).
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t count) { resize(count); }
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { swap(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    swap(other);
    return *this;
  }

  // Reallocates only when count changes; contents are not preserved.
  void resize(size_t count) {
    if (count == count_) return;
    reset();
    if (count > 0) ptr_ = static_cast<T*>(DeviceAllocator::instance().allocate(count * sizeof(T)));
    count_ = count;
  }
  void reset() {
    if (ptr_ != nullptr) DeviceAllocator::instance().deallocate(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  void swap(DeviceBuffer& other) noexcept {
    std::swap(ptr_, other.ptr_);
    std::swap(count_, other.count_);
  }

  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

  // Synchronous copies (tests, checkpoints); the buffer is resized to the host vector.
  void upload(const std::vector<T>& host);
  std::vector<T> download() const;
  void fill_zero(cudaStream_t stream);

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// Page-locked host memory (cudaMallocHost / cudaFreeHost).
void* allocate_pinned_host(size_t bytes);
void free_pinned_host(void* ptr);

// Page-locked host memory for count elements of T: the target of asynchronous device-to-host
// copies that must not block the host (a copy into pageable memory waits for the stream).
template <typename T>
class PinnedHostBuffer {
 public:
  PinnedHostBuffer() = default;
  ~PinnedHostBuffer() { reset(); }
  PinnedHostBuffer(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer& operator=(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer(PinnedHostBuffer&& other) noexcept { swap(other); }
  PinnedHostBuffer& operator=(PinnedHostBuffer&& other) noexcept {
    swap(other);
    return *this;
  }
  void swap(PinnedHostBuffer& other) noexcept {
    std::swap(ptr_, other.ptr_);
    std::swap(count_, other.count_);
  }

  // Reallocates (zero-filled) only when count changes.
  void resize(size_t count) {
    if (count == count_) return;
    reset();
    if (count > 0) {
      ptr_ = static_cast<T*>(allocate_pinned_host(count * sizeof(T)));
      std::fill(ptr_, ptr_ + count, T{});
    }
    count_ = count;
  }
  void reset() {
    if (ptr_ != nullptr) free_pinned_host(ptr_);
    ptr_ = nullptr;
    count_ = 0;
  }
  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }
  T operator[](size_t i) const { return ptr_[i]; }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// Synchronous copies between host memory and device memory (count elements of T).
void copy_to_device(void* dst, const void* src, size_t bytes);
void copy_to_host(void* dst, const void* src, size_t bytes);
void zero_device(void* dst, size_t bytes, cudaStream_t stream);
// rows x row_bytes from src (rows src_pitch bytes apart) to dst (dst_pitch apart), on stream.
void copy_rows_async(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                     size_t row_bytes, size_t rows, cudaStream_t stream);
// The same in elements of T: rows x cols of row-major matrices with row strides in elements.
template <typename T>
void copy_rows_async(T* dst, int64_t dst_stride, const T* src, int64_t src_stride, int64_t rows,
                     int64_t cols, cudaStream_t stream) {
  copy_rows_async(static_cast<void*>(dst), static_cast<size_t>(dst_stride) * sizeof(T),
                  static_cast<const void*>(src), static_cast<size_t>(src_stride) * sizeof(T),
                  static_cast<size_t>(cols) * sizeof(T), static_cast<size_t>(rows), stream);
}

template <typename T>
void DeviceBuffer<T>::upload(const std::vector<T>& host) {
  resize(host.size());
  copy_to_device(ptr_, host.data(), host.size() * sizeof(T));
}

template <typename T>
std::vector<T> DeviceBuffer<T>::download() const {
  std::vector<T> host(count_);
  copy_to_host(host.data(), ptr_, count_ * sizeof(T));
  return host;
}

template <typename T>
void DeviceBuffer<T>::fill_zero(cudaStream_t stream) {
  zero_device(ptr_, bytes(), stream);
}

}  // namespace moeforge::cuda
