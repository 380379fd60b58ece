"""Installs python/epx with libepx inside it.

Where the library comes from, in order: $EPX_LIBRARY (a built libepx.so), the checkout's build tree
(../build/lib, or $EPX_BUILD_DIR/lib), else a fresh CMake build of the checkout into
../build-python (needs cmake and a C compiler; CUDA is used when CMake finds it). The library is
copied into the package, so the installed package needs nothing else. Set EPX_SKIP_LIBRARY=1 to
install the Python files only (the package then finds the library through $EPX_LIBRARY at run time).
"""
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _find_or_build():
    env = os.environ.get("EPX_LIBRARY")
    if env:
        return os.path.join(env, "libepx.so") if os.path.isdir(env) else env
    build = os.environ.get("EPX_BUILD_DIR") or os.path.join(ROOT, "build")
    for d in (build, os.path.join(ROOT, "build-python")):
        lib = os.path.join(d, "lib", "libepx.so")
        if os.path.exists(lib):
            return lib
    if not os.path.exists(os.path.join(ROOT, "CMakeLists.txt")):
        raise RuntimeError("libepx not found: set EPX_LIBRARY to a built libepx.so, or install from a checkout")
    out = os.path.join(ROOT, "build-python")
    subprocess.check_call(["cmake", "-S", ROOT, "-B", out, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_TESTING=OFF"])
    subprocess.check_call(["cmake", "--build", out, "--target", "epx", "-j", str(os.cpu_count() or 2)])
    return os.path.join(out, "lib", "libepx.so")


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        if os.environ.get("EPX_SKIP_LIBRARY") == "1":
            return
        lib = os.path.realpath(_find_or_build())
        dest = os.path.join(self.build_lib, "epx", "libepx.so")
        self.mkpath(os.path.dirname(dest))
        shutil.copyfile(lib, dest)
        print("epx: bundled %s" % lib)


class BinaryDistribution(Distribution):
    def has_ext_modules(self):  # the wheel carries a platform library
        return os.environ.get("EPX_SKIP_LIBRARY") != "1"


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
