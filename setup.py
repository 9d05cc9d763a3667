"""Builds the optional C++ kernels (chatglm/kernels/csrc) with torch's extension tools.

Everything else lives in pyproject.toml. The build targets the machine it runs on (-march=native);
if the compiler or torch's headers fail, the package installs without the extension and runs on
torch's own kernels.
"""
import warnings

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # torch is not installed yet: nothing to build against
    BuildExtension = CppExtension = None


def optional(build_ext_class):
    """A build_ext that warns instead of failing when the kernels do not compile."""

    class Optional(build_ext_class):
        def run(self):
            try:
                super().run()
            except Exception as e:  # no compiler, or it failed: its own output is above
                self.failed = True
                warnings.warn(f"chatglm: C++ kernels not built ({e}); using torch's kernels instead")

        def get_outputs(self):  # nothing to install when the build failed
            return [] if getattr(self, "failed", False) else super().get_outputs()

    return Optional


if CppExtension is None:
    warnings.warn("chatglm: torch is not installed, so the C++ kernels are not built")
    setup()
else:
    setup(
        ext_modules=[CppExtension("chatglm.kernels._ggml", ["chatglm/kernels/csrc/ggml_kernels.cpp",
                                                         "chatglm/kernels/csrc/decode_step.cpp",
                                                         "chatglm/kernels/csrc/latent_moe_step.cpp",
                                                         "chatglm/kernels/csrc/prompt_ops.cpp"],
                                  # -fopenmp: at::parallel_for is OpenMP inside torch's headers; without it, one thread
                                  extra_compile_args=["-O3", "-march=native", "-fopenmp"], extra_link_args=["-fopenmp"])],
        cmdclass={"build_ext": optional(BuildExtension)},
    )
