"""Build hook for the optional C extension edge_workers.qcnn._fastscan (Q-CNN fast-scan kernels).

Everything else about the package lives in pyproject.toml. The extension is optional:
without a working C compiler the build prints one warning and installs the pure-Python
package, and edgeq runs Q-CNN layers with its numba kernels (edge_workers/qcnn/fastscan.py).
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: a missing or broken compiler skips the extension."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # distutils raises several unrelated types for "no compiler"
            self._skip(err)

    def build_extension(self, ext):
        if self.compiler.compiler_type != "msvc":
            ext.extra_compile_args = ["-O3", "-fvisibility=hidden"]
        try:
            super().build_extension(ext)
        except Exception as err:
            self._skip(err)

    @staticmethod
    def _skip(err):
        print(f"WARNING: edgeq: not building the Q-CNN native kernels ({type(err).__name__}: {err}); "
              "the numba kernels will be used", file=sys.stderr)


setup(
    ext_modules=[Extension("edge_workers.qcnn._fastscan", ["edge_workers/qcnn/native/fastscan.c"],
                           depends=["edge_workers/qcnn/native/fastscan_kernels.h", "edge_workers/qcnn/native/net.h",
                                    "edge_workers/qcnn/native/net_hwc.h", "edge_workers/qcnn/native/scan_seg.h"],
                           optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
