"""Compile a CUDA file of these spikes for sm_90a without a GPU, with NVRTC from the pip wheel
``nvidia-cuda-nvrtc-cu12`` (``pip download --no-deps nvidia-cuda-nvrtc-cu12``, unzip it), and print
each kernel's registers, stack and shared memory (Triton's wheel ships ``cuobjdump``).

    python docs/bench/s18_cluster_spike/compile_offline.py /path/to/libnvrtc.so.12 [FILE.cu] [-DNAME=VALUE ...]

FILE.cu defaults to this folder's ``cluster_allreduce.cu``; e.g.
``docs/bench/s19_cluster_spike/cluster_mlp_fwd_cl.cu -DCL=4``. The cubin is written to
``$TMPDIR`` (default /tmp) for ``nvdisasm -c``.
"""
import ctypes
import os
import subprocess
import sys

import triton

here = os.path.dirname(os.path.abspath(__file__))
lib = ctypes.CDLL(sys.argv[1])
path = sys.argv[2] if len(sys.argv) > 2 and not sys.argv[2].startswith("-D") else os.path.join(here, "cluster_allreduce.cu")
defines = [a.encode() for a in sys.argv[2:] if a.startswith("-D")]
name = os.path.basename(path)
src = open(path).read().encode()
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, name.encode(), 0, None, None) == 0
opts = [b"--gpu-architecture=sm_90a", b"-default-device", b"--std=c++17", b"-I" + os.path.dirname(os.path.abspath(path)).encode()] + defines
rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
size = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
lib.nvrtcGetProgramLog(prog, log)
print("nvrtc:", "ok" if rc == 0 else f"error {rc}", log.value.decode())
if rc:
    sys.exit(1)
lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
cubin = ctypes.create_string_buffer(size.value)
lib.nvrtcGetCUBIN(prog, cubin)
out = os.path.join(os.environ.get("TMPDIR", "/tmp"), os.path.splitext(name)[0] + ".cubin")
open(out, "wb").write(cubin.raw)
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
print(subprocess.run([tool, "--dump-resource-usage", out], capture_output=True, text=True).stdout)
