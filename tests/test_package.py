"""The package's public API: every name in __all__ resolves, and importing the package loads no torch."""

import subprocess
import sys

import rome_locate


def test_every_public_name_resolves_to_its_stage_module():
    for name in rome_locate.__all__:
        value = getattr(rome_locate, name)
        if name != "__version__":
            assert value.__module__.startswith("rome_locate."), name


def test_import_is_light_and_unknown_names_are_attribute_errors():
    code = ("import sys, rome_locate; assert 'torch' not in sys.modules; "
            "assert not hasattr(rome_locate, 'no_such_name'); print('light')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "light"
