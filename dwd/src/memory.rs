//! How much memory the process and the device use, the budget loaded components must fit
//! in, and the baseline that later runs are compared with to warn about growth.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Device;
pub use protocol::units::human_bytes;

/// This process's resident set size, from /proc/self/statm.
pub fn resident_set_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page_size).unwrap_or(4096)
}

/// This process's peak resident set size (VmHWM), from /proc/self/status; 0 if unknown.
pub fn peak_resident_set_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Total RAM, from /proc/meminfo.
/// Memory the kernel can still give this process without swapping (`MemAvailable`).
pub fn available_ram_bytes() -> u64 {
    meminfo_bytes("MemAvailable:")
}

/// A `/proc/meminfo` line's value in bytes (0 when unreadable).
fn meminfo_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// The memory a budget is a share of, and what set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    /// `physical memory`, `cgroup v2 memory.max`, `cgroup v1 memory.limit_in_bytes`.
    pub source: String,
}

/// The host memory this process may use: physical memory, or less where a container's
/// cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`) under `cgroup_root` (normally
/// `/sys/fs/cgroup`) caps it.
pub fn host_memory_limit(cgroup_root: &std::path::Path) -> MemoryLimit {
    let mut limit = MemoryLimit {
        bytes: total_ram_bytes(),
        source: "physical memory".to_string(),
    };
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| p.trim_start_matches('/').to_string())
        })
        .unwrap_or_default();
    let candidates = [
        (
            cgroup_root.join(&own).join("memory.max"),
            "cgroup v2 memory.max",
        ),
        (cgroup_root.join("memory.max"), "cgroup v2 memory.max"),
        (
            cgroup_root.join("memory/memory.limit_in_bytes"),
            "cgroup v1 memory.limit_in_bytes",
        ),
    ];
    for (file, source) in candidates {
        let value = std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok());
        if let Some(bytes) = value.filter(|&b| b > 0 && (limit.bytes == 0 || b < limit.bytes)) {
            limit = MemoryLimit {
                bytes,
                source: source.to_string(),
            };
        }
    }
    limit
}

pub fn total_ram_bytes() -> u64 {
    meminfo_bytes("MemTotal:")
}

/// Used and total bytes of the device's memory, from the driver; `None` on the CPU.
pub fn device_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
        // The device's context must be current on this thread for the driver to answer.
        let _ = cuda.cuda_stream().context().bind_to_thread();
        return mem_get_info()
            .ok()
            .map(|(free, total)| ((total - free) as u64, total as u64));
    }
    let _ = device;
    None
}

/// Tunes glibc's allocator for tensor work; call once at start, before other threads exist.
///
/// By default glibc serves every allocation above 128 KiB-32 MiB with its own `mmap` and
/// returns it with `munmap` on free, and gives each thread its own arena. A denoising step
/// allocates and frees hundreds of buffers of tens to hundreds of MiB, so each one came back
/// as fresh zeroed pages: on a full-size UNet that was millions of page faults and a third
/// of the step's time in the kernel. Here large buffers come from one heap and are reused
/// from its free lists; [`release_freed_memory`] hands the pages back after each run and on
/// unload, so between runs the process still holds only what it keeps.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes glibc's allocator parameters; it is called before any
    // other thread allocates.
    unsafe {
        // One arena: buffers freed by one thread are reused by the next job's thread.
        libc::mallopt(libc::M_ARENA_MAX, 1);
        // Serve large buffers from the heap instead of a fresh mapping each time.
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        // Do not give the heap's top back on every free; `release_freed_memory` trims.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The GPU whose allocator [`release_freed_memory`] also trims, set once at start.
static GPU: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Makes [`release_freed_memory`] trim `device`'s memory pool too (a no-op on the CPU).
pub fn register_device(device: &Device) {
    if !device.is_cpu() {
        let _ = GPU.set(device.clone());
    }
}

/// Gives freed memory back to the system, so unloading shows where it is measured: freed
/// heap pages (the RSS), and on a GPU the memory its stream-ordered allocator keeps in its
/// pool after tensors are dropped, which the driver otherwise counts as used until the
/// process ends.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap structures.
    unsafe {
        libc::malloc_trim(0);
    }
    if let Some(device) = GPU.get() {
        trim_device_pool(device);
    }
}

/// Returns the memory the device's pool holds beyond what live allocations use.
fn trim_device_pool(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let stream = cuda.cuda_stream();
        let context = stream.context();
        if !context.has_async_alloc() || context.bind_to_thread().is_err() {
            return;
        }
        // Frees are stream-ordered: memory reaches the pool when the stream gets there.
        let _ = stream.synchronize();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: the context is current on this thread; `pool` receives the device's
        // current pool, which lives as long as the context; trimming only releases
        // memory no allocation uses.
        unsafe {
            if sys::cuDeviceGetMemPool(&mut pool, context.cu_device())
                == sys::cudaError_enum::CUDA_SUCCESS
            {
                let _ = sys::cuMemPoolTrimTo(pool, 0);
            }
        }
    }
    let _ = device;
}

/// The memory that matters for a device: the device's own on a GPU, the process's on the CPU.
pub fn measured_bytes(device: &Device) -> u64 {
    device_memory(device)
        .map(|(used, _)| used)
        .unwrap_or_else(resident_set_bytes)
}

/// The memory measured right after the last load, shared between the engine and status.
#[derive(Debug, Default)]
pub struct Baseline(AtomicU64);

impl Baseline {
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::SeqCst);
    }

    pub fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            bytes => Some(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_limit_below_physical_memory_sets_the_budget_base() {
        let root = tempfile::tempdir().unwrap();
        let none = host_memory_limit(root.path());
        assert_eq!(none.source, "physical memory");
        std::fs::write(root.path().join("memory.max"), "max\n").unwrap();
        assert_eq!(host_memory_limit(root.path()).source, "physical memory");
        std::fs::write(root.path().join("memory.max"), "104857600\n").unwrap();
        let limited = host_memory_limit(root.path());
        assert_eq!(limited.bytes, 104_857_600);
        assert_eq!(limited.source, "cgroup v2 memory.max");
        std::fs::remove_file(root.path().join("memory.max")).unwrap();
        std::fs::create_dir(root.path().join("memory")).unwrap();
        std::fs::write(root.path().join("memory/memory.limit_in_bytes"), "52428800").unwrap();
        assert_eq!(
            host_memory_limit(root.path()).source,
            "cgroup v1 memory.limit_in_bytes"
        );
    }

    #[test]
    fn this_process_has_a_resident_set_and_the_machine_has_ram() {
        assert!(resident_set_bytes() > 0);
        assert!(peak_resident_set_bytes() > 0);
        assert!(total_ram_bytes() > resident_set_bytes());
        assert_eq!(device_memory(&Device::Cpu), None);
    }
}
