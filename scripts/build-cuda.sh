#!/usr/bin/env bash
# Builds dwd with CUDA (`--features cuda`), also on a machine with no GPU and no CUDA toolkit.
#
# Usage: scripts/build-cuda.sh            -> target/cuda/release/dwd and the unet_step example
#                                           (its own target folder, so the CPU build in
#                                           target/release stays as it is)
# Env:   CUDA_COMPUTE_CAP (default 90: H100/H200), DW_CUDA_TOOLKIT (where the toolkit wheels
#        go, default target/cuda-toolkit), CUDA_HOME (use an installed toolkit instead).
#
# Without a toolkit it installs NVIDIA's CUDA 13.0 wheels from PyPI (about 660 MB; 13.0, not
# newer: candle ships its kernels as PTX compiled by the driver at start-up, and PTX from a
# newer nvcc is refused by the 580 drivers). candle links the CUDA libraries at build time,
# so the linker gets unversioned library names and a link-only libcuda stub (the real
# libcuda.so.1 comes with the driver on the GPU machine; the stub must never be on the
# library path at run time). The binary then needs libcudart.so.13, libcublas(Lt).so.13,
# libcurand.so.10 and libnvrtc at run time: PyTorch's nvidia wheels carry them
# (scripts/gpu-check.sh sets LD_LIBRARY_PATH to them).
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    cuda=$CUDA_HOME
else
    toolkit=${DW_CUDA_TOOLKIT:-$PWD/target/cuda-toolkit}
    cuda=$toolkit/nvidia/cu13
    if [ ! -x "$cuda/bin/nvcc" ]; then
        echo "installing the CUDA 13.0 toolkit wheels into $toolkit"
        python3 -m pip install --quiet --no-deps --target "$toolkit" \
            nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
            nvidia-cuda-runtime==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
            nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
    fi
    for lib in cudart cublas cublasLt curand nvrtc; do
        versioned=$(ls "$cuda/lib/lib$lib.so."* 2>/dev/null | sort | head -n 1)
        [ -n "$versioned" ] || { echo "missing lib$lib in $cuda/lib" >&2; exit 1; }
        ln -sf "$(basename "$versioned")" "$cuda/lib/lib$lib.so"
    done
    if [ ! -f "$cuda/lib/stubs/libcuda.so" ]; then
        echo "making the link-only libcuda stub"
        cargo fetch --quiet
        cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort | tail -n 1)
        mkdir -p "$cuda/lib/stubs"
        grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$cudarc/src/driver/sys/mod.rs" \
            | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u > "$cuda/lib/stubs/libcuda.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$cuda/lib/stubs/libcuda.c"
    fi
fi

export CUDA_HOME=$cuda CUDA_PATH=$cuda CUDA_ROOT=$cuda PATH=$cuda/bin:$PATH
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
export RUSTFLAGS="${RUSTFLAGS:-} -L $cuda/lib -L $cuda/lib/stubs"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
echo "building dwd with CUDA (compute capability $CUDA_COMPUTE_CAP, $(nvcc --version | tail -n 1))"
cargo build --release -p dwd --features cuda --bins --example unet_step
echo "built $CARGO_TARGET_DIR/release/dwd (and examples/unet_step) with CUDA"
