"""Build megapre's compiled extensions.

megapre._C       C++ CPU kernels (+ op schemas); always built.
megapre._C_cuda  CUDA kernels; built when a CUDA toolkit and a CUDA build of torch are present.

MEGAPRE_BUILD_CUDA=auto|1|0 (default auto; 1 fails loudly when CUDA cannot be built).
TORCH_CUDA_ARCH_LIST picks GPU architectures; unset and no GPU visible -> DEFAULT_ARCHS.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

DEFAULT_ARCHS = "8.0;9.0+PTX"
ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"[megapre build] {msg}", flush=True)


def _nvcc_behind(path: str) -> str | None:
    """Resolve an nvcc found on PATH to the real binary: follow symlinks, and read through
    wrapper scripts (`exec /opt/cuda/bin/nvcc "$@"`), which otherwise make torch guess the
    toolkit root wrong."""
    real = os.path.realpath(path)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return real
    for cand in re.findall(rb"(/[^\s\"']*/bin/nvcc)\b", head):
        cand = os.path.realpath(cand.decode())
        if os.path.isfile(cand) and cand != real:
            return _nvcc_behind(cand)
    return None


def _toolkit_version(home: str) -> tuple[int, ...]:
    m = re.search(r"cuda-(\d+)\.(\d+)", home)
    return tuple(int(g) for g in m.groups()) if m else (0, 0)


def find_cuda_home(torch_cuda: str | None) -> str | None:
    """CUDA_HOME/CUDA_PATH if set, else the toolkit behind `nvcc` on PATH, else the
    /usr/local/cuda* toolkit whose major version matches torch's CUDA."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = _nvcc_behind(nvcc)
        if real:
            return os.path.dirname(os.path.dirname(real))
    homes = [h for h in glob.glob("/usr/local/cuda*") if os.path.isfile(os.path.join(h, "bin", "nvcc"))]
    if torch_cuda:
        major = int(torch_cuda.split(".")[0])
        matching = [h for h in homes if _toolkit_version(h)[0] == major]
        homes = matching or homes
    return max(homes, key=_toolkit_version) if homes else None


def cuda_wanted() -> bool:
    """Decide whether to build _C_cuda. Sets CUDA_HOME before cpp_extension is imported
    (it reads CUDA_HOME once, at import)."""
    mode = os.environ.get("MEGAPRE_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MEGAPRE_BUILD_CUDA={mode!r}: use auto, 1 or 0")
    if mode == "0":
        log("CUDA extension: off (MEGAPRE_BUILD_CUDA=0)")
        return False
    import torch

    problem = None
    home = find_cuda_home(torch.version.cuda)
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    elif home is None:
        problem = "no CUDA toolkit found (set CUDA_HOME to the toolkit root, the folder holding bin/nvcc)"
    if problem:
        if mode == "1":
            sys.exit(f"MEGAPRE_BUILD_CUDA=1 but {problem}")
        log(f"CUDA extension: skipped ({problem}); set MEGAPRE_BUILD_CUDA=1 to make this an error")
        return False
    os.environ["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs' architectures"
    log(f"CUDA extension: toolkit {home} (torch CUDA {torch.version.cuda}), archs {archs}")
    return True


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def extensions(with_cuda: bool) -> list:
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden"]
    # at::parallel_for is an inline template: without -fopenmp it compiles to a serial loop
    # in our code (ATen/ParallelOpenMP.h only defines the parallel version under _OPENMP).
    # libgomp.so.1 resolves to the copy torch has already loaded, so one thread pool is shared.
    omp = ["-fopenmp"]
    exts = [
        CppExtension(
            "megapre._C",
            sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/data/*.cpp"),
            extra_compile_args={"cxx": cxx + omp},
            extra_link_args=omp,
        )
    ]
    if with_cuda:
        nvcc = ["-O3", "-std=c++20", "-lineinfo"]
        exts.append(
            CUDAExtension(
                "megapre._C_cuda",
                sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            )
        )
    return exts


def main() -> None:
    with_cuda = cuda_wanted()
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="megapre",
        version="0.1.0",
        description="Megatron-style LM pretraining with fused CPU/CUDA kernels",
        packages=find_packages(include=["megapre", "megapre.*"]),
        python_requires=">=3.10",
        install_requires=["torch>=2.4", "numpy", "tokenizers>=0.15", "pyyaml"],
        extras_require={
            "data": ["sentencepiece", "zstandard", "pyarrow", "tiktoken", "orjson"],
            "logging": ["tensorboard", "wandb"],
            "plot": ["matplotlib"],
            "eval": ["lm-eval", "scikit-learn"],
            "interop": ["transformers", "safetensors"],
            "megatron": ["megatron-core", "psutil"],  # megapre-convert mcore-export
            "onnx": ["onnx", "onnxruntime", "onnxscript"],  # megapre-convert onnx
            "test": ["pytest", "ninja", "pybind11", "megatron-core>=0.12", "regex"],
        },
        entry_points={"console_scripts": [
            "megapre-pretrain = megapre.cli.pretrain:main",
            "megapre-pretrain-gpt = megapre.cli.megatron_entry:gpt",
            "megapre-pretrain-bert = megapre.cli.megatron_entry:bert",
            "megapre-finetune = megapre.cli.finetune:main",
            "megapre-preprocess-data = megapre.cli.preprocess_data:main",
            "megapre-train-tokenizer = megapre.cli.train_tokenizer:main",
            "megapre-merge-datasets = megapre.cli.merge_datasets:main",
            "megapre-build-index = megapre.cli.build_index:main",
            "megapre-make-demo-corpus = megapre.cli.make_demo_corpus:main",
            "megapre-make-authorship-task = megapre.cli.make_authorship_task:main",
            "megapre-evaluate = megapre.cli.evaluate:main",
            "megapre-generate = megapre.cli.generate:main",
            "megapre-sweep = megapre.cli.sweep:main",
            "megapre-estimate-memory = megapre.cli.estimate_memory:main",
            "megapre-checkpoint = megapre.cli.checkpoint:main",
            "megapre-bert-samples = megapre.cli.bert_samples:main",
            "megapre-plot = megapre.cli.plot_metrics:main",
            "megapre-lm-eval = megapre.cli.lm_eval:main",
            "megapre-convert = megapre.cli.convert:main",
            "megapre-compress = megapre.cli.compress:main",
        ]},
        ext_modules=extensions(with_cuda),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
