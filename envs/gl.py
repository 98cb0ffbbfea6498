"""MuJoCo's GL backend: chosen before mujoco is imported, and checked so that a machine that cannot
render says which system package or setting fixes it (instead of a traceback from inside mujoco).

``MUJOCO_GL`` defaults to ``egl`` (headless, Mesa's llvmpipe on a CPU); ``osmesa`` also needs
PyOpenGL told; ``glfw`` needs a display. Importing :mod:`envs` runs :func:`select_backend` and
:func:`check_gl_backend` before anything imports mujoco.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

MUJOCO_IMPORTED_FIRST = "mujoco" in sys.modules  # then MUJOCO_GL below came too late (the message says so)


def select_backend() -> None:
    """Default ``MUJOCO_GL`` to egl (users may override); quiet PyOpenGL's optional-module notice."""
    if not os.environ.get("MUJOCO_GL"):  # unset or empty
        os.environ["MUJOCO_GL"] = "egl"
    if os.environ["MUJOCO_GL"] == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    # PyOpenGL logs "No OpenGL_accelerate module loaded" at INFO on every run; the module is optional
    logging.getLogger("OpenGL.acceleratesupport").setLevel(logging.WARNING)


class RenderError(RuntimeError):
    """MuJoCo cannot render offscreen on this machine; the message names the system package or setting."""

    user_fixable = True  # the CLIs print the message without a traceback (emu_world.errors)


GL_LIBRARIES = {"egl": ("libEGL.so.1", "libEGL.so"), "osmesa": ("libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so.0", "libOSMesa.so")}
GL_FIX = {
    "egl": "install EGL and Mesa (`apt-get install libegl1 libgl1-mesa-dri`), or render with OSMesa instead "
           "(`apt-get install libosmesa6`, then MUJOCO_GL=osmesa)",
    "osmesa": "install it (`apt-get install libosmesa6`), or render with EGL (`apt-get install libegl1 "
              "libgl1-mesa-dri`, then MUJOCO_GL=egl, the default)",
}


def check_gl_backend() -> None:
    """Fail early, with the fix, when the backend MUJOCO_GL names cannot work here: its library is not
    installed (egl, osmesa), or it needs a display that is not there (glfw)."""
    backend = os.environ.get("MUJOCO_GL", "egl")
    if backend == "glfw" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise RenderError("MUJOCO_GL=glfw opens a window, and this machine has no display (DISPLAY is not set). "
                          "Unset MUJOCO_GL (the default, egl, renders headless) or set MUJOCO_GL=osmesa.")
    names = GL_LIBRARIES.get(backend, ())
    errors = []
    for name in names:
        try:
            ctypes.CDLL(name)
            return
        except OSError as e:
            errors.append(str(e))
    if names:
        raise RenderError(f"MuJoCo renders with MUJOCO_GL={backend}, but {names[0]} cannot be loaded "
                          f"({errors[0]}): {GL_FIX[backend]}.")


def gl_failure_message(error: str) -> str:
    """Why mujoco (its import, or ``mujoco.Renderer``) failed, with the fix."""
    backend = os.environ.get("MUJOCO_GL", "egl")
    if MUJOCO_IMPORTED_FIRST:
        return (f"MuJoCo could not create an offscreen GL context ({error}): mujoco was imported before `envs` "
                f"could set MUJOCO_GL. Set MUJOCO_GL=egl (or osmesa) in the environment, or import envs first.")
    return (f"MuJoCo could not create an offscreen GL context with MUJOCO_GL={backend} ({error}). "
            + (f"To fix it, {GL_FIX[backend]}." if backend in GL_FIX else
               "Use MUJOCO_GL=egl (the default) or osmesa on a headless machine."))
