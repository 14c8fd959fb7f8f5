"""Build the Cython extensions; all metadata lives in pyproject.toml.

Every ``fastscp/**/NAME.pyx`` becomes the extension module of that name, beside
its pure-Python twin (``fastscp/dicom/_header_cext.pyx`` ->
``fastscp.dicom._header_cext``, twin of ``fastscp/dicom/_header_py.py``).
Shared inline helpers are ``.pxd`` files in the same package, cimported
relatively (``from .vr cimport is_vr``).

Environment switches:

``FASTSCP_CYTHON_TRACE=1``
    Compile with line tracing (for coverage and profilers); slower code.
``FASTSCP_CYTHON_ANNOTATE=1``
    Write Cython's HTML annotation next to each ``.pyx`` (off by default).
``FASTSCP_CYTHON_ALWAYS=1``
    Regenerate the C code even if the ``.pyx`` files did not change.

Both ``pip install -e .`` and ``python setup.py build_ext --inplace`` work.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
PACKAGE = "fastscp"  # relative to HERE: setuptools wants relative source paths
#: BLAKE3's C implementation (cext/blake3/README.md): the x86-64 assembly where it runs, chosen at
#: run time by CPU; elsewhere the portable code alone.
BLAKE3 = "cext/blake3"
if platform.machine() in ("x86_64", "AMD64") and os.name != "nt":
    BLAKE3_SOURCES = [f"{BLAKE3}/{name}" for name in (
        "blake3.c", "blake3_dispatch.c", "blake3_portable.c", "blake3_sse2_x86-64_unix.S",
        "blake3_sse41_x86-64_unix.S", "blake3_avx2_x86-64_unix.S", "blake3_avx512_x86-64_unix.S")]
    BLAKE3_MACROS: list[tuple[str, str | None]] = []
else:
    BLAKE3_SOURCES = [f"{BLAKE3}/{name}" for name in ("blake3.c", "blake3_dispatch.c", "blake3_portable.c")]
    BLAKE3_MACROS = [(f"BLAKE3_NO_{kind}", None) for kind in ("SSE2", "SSE41", "AVX2", "AVX512")]
#: What an extension is built with besides its .pyx, by module: C sources, their headers and macros.
C_CODE: dict[str, tuple[list[str], list[str], list[tuple[str, str | None]]]] = {
    "fastscp.net._datapath_cext": (BLAKE3_SOURCES, [BLAKE3], BLAKE3_MACROS),  # the content hash in the loop
}


class BuildExt(build_ext):
    """build_ext that also compiles assembly (``.S``: gcc runs the preprocessor on it)."""

    def build_extensions(self) -> None:
        self.compiler.src_extensions.append(".S")
        super().build_extensions()


def _flag(name: str) -> bool:
    return os.environ.get(name, "") == "1"


def extensions() -> list[Extension]:
    """One Extension per ``fastscp/**/*.pyx``, cythonized."""
    from Cython.Build import cythonize

    trace = _flag("FASTSCP_CYTHON_TRACE")
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    if trace:
        macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    include_dirs = []
    try:  # numpy headers for the modules that cimport numpy
        import numpy

        include_dirs.append(numpy.get_include())
    except ImportError:
        pass
    modules = []
    for pyx in sorted((HERE / PACKAGE).rglob("*.pyx")):
        name = ".".join(pyx.relative_to(HERE).with_suffix("").parts)
        sources, headers, defines = C_CODE.get(name, ([], [], []))
        modules.append(Extension(
            name, [str(pyx.relative_to(HERE)), *sources], include_dirs=include_dirs + headers,
            define_macros=macros + defines, extra_compile_args=["-O3"] if os.name != "nt" else []))
    annotate = _flag("FASTSCP_CYTHON_ANNOTATE")
    return cythonize(
        modules,
        annotate=annotate,
        # Cython only compares timestamps, not directives: regenerate the C
        # code when a switch asks for different code.
        force=trace or annotate or _flag("FASTSCP_CYTHON_ALWAYS"),
        compiler_directives={
            "language_level": 3,
            "linetrace": trace,
            "profile": False,
            "embedsignature": True,
        },
    )


if __name__ == "__main__":
    os.chdir(HERE)  # relative paths above are relative to the project
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
