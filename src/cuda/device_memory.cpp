// The caching device allocator and the synchronous copy helpers of DeviceBuffer.
#include "cuda/device_memory.h"

#include "core/error.h"
#include "cuda/cuda_check.h"

namespace moeforge::cuda {

DeviceAllocator& DeviceAllocator::instance() {
  static DeviceAllocator* allocator = new DeviceAllocator();  // outlives static destructors
  return *allocator;
}

size_t DeviceAllocator::size_class(size_t bytes) {
  constexpr size_t kSmallLimit = size_t{1} << 20;
  constexpr size_t kLargeGranule = size_t{2} << 20;
  if (bytes <= kSmallLimit) {
    size_t c = 512;
    while (c < bytes) c <<= 1;
    return c;
  }
  return (bytes + kLargeGranule - 1) / kLargeGranule * kLargeGranule;
}

void* DeviceAllocator::allocate(size_t bytes) {
  MF_CHECK(bytes > 0, "device allocation of 0 bytes");
  const size_t cls = size_class(bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  void* ptr = nullptr;
  auto it = free_blocks_.find(cls);
  if (it != free_blocks_.end()) {
    ptr = it->second;
    free_blocks_.erase(it);
  } else {
    cudaError_t status = cudaMalloc(&ptr, cls);
    if (status == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      for (auto& [size, block] : free_blocks_) {
        MF_CUDA_CHECK(cudaFree(block));
        reserved_ -= size;
      }
      free_blocks_.clear();
      status = cudaMalloc(&ptr, cls);
    }
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      MF_CHECK(status != cudaErrorMemoryAllocation,
               "out of GPU memory: allocating {:.1f} MiB with {:.1f} MiB in use",
               static_cast<double>(cls) / (1 << 20), static_cast<double>(in_use_) / (1 << 20));
      MF_FAIL(
          "cannot allocate GPU memory ({:.1f} MiB): {} (is there a CUDA device and driver? "
          "`moeforge devices` lists them)",
          static_cast<double>(cls) / (1 << 20), cudaGetErrorString(status));
    }
    reserved_ += cls;
  }
  live_blocks_[ptr] = cls;
  in_use_ += cls;
  if (in_use_ > peak_) peak_ = in_use_;
  return ptr;
}

void DeviceAllocator::deallocate(void* ptr) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = live_blocks_.find(ptr);
  MF_CHECK(it != live_blocks_.end(), "freeing a device pointer the allocator does not own");
  if (held_ != nullptr) {
    held_->push_back(ptr);
    return;
  }
  in_use_ -= it->second;
  free_blocks_.emplace(it->second, ptr);
  live_blocks_.erase(it);
}

void DeviceAllocator::begin_hold(std::vector<void*>* held) {
  std::lock_guard<std::mutex> lock(mutex_);
  MF_CHECK(held_ == nullptr, "a device memory hold is open already (one capture at a time)");
  held_ = held;
}

void DeviceAllocator::end_hold() {
  std::lock_guard<std::mutex> lock(mutex_);
  held_ = nullptr;
}

void DeviceAllocator::release_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [size, block] : free_blocks_) {
    MF_CUDA_CHECK(cudaFree(block));
    reserved_ -= size;
  }
  free_blocks_.clear();
}

size_t DeviceAllocator::bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return in_use_;
}

size_t DeviceAllocator::peak_bytes_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return peak_;
}

size_t DeviceAllocator::bytes_reserved() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return reserved_;
}

void DeviceAllocator::reset_peak() {
  std::lock_guard<std::mutex> lock(mutex_);
  peak_ = in_use_;
}

void copy_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) MF_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

void copy_to_host(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) MF_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

void* allocate_pinned_host(size_t bytes) {
  void* ptr = nullptr;
  MF_CUDA_CHECK(cudaMallocHost(&ptr, bytes));
  return ptr;
}

void free_pinned_host(void* ptr) {
  cudaFreeHost(ptr);
}

void zero_device(void* dst, size_t bytes, cudaStream_t stream) {
  if (bytes > 0) MF_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream));
}

void copy_rows_async(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                     size_t row_bytes, size_t rows, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return;
  MF_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows,
                                  cudaMemcpyDeviceToDevice, stream));
}

}  // namespace moeforge::cuda
