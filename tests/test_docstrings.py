"""Every public function, class and method of the library and of the demo has a docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import batchnorm
import batchnorm_demo


def _public_members():
    infos = [
        info
        for package in (batchnorm, batchnorm_demo)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    ]
    for info in infos:
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj
            elif inspect.isclass(obj):
                yield f"{module.__name__}.{name}", obj
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if inspect.isfunction(member) or isinstance(member, property):
                        yield f"{module.__name__}.{name}.{attr}", member


def test_every_public_callable_has_a_docstring():
    members = list(_public_members())
    assert len(members) > 100  # the walk really covers the package
    missing = [name for name, obj in members if not (obj.__doc__ or "").strip()]
    assert not missing, f"{len(missing)} public callables lack a docstring: {missing}"
