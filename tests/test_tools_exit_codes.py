"""Every tool's main returns the process's exit code, so that `python -m mgssl.tools.X` and a caller
of main() see the same outcome."""
import importlib
import inspect
import pkgutil

import pytest

import mgssl.tools

TOOLS = sorted(m.name for m in pkgutil.iter_modules(mgssl.tools.__path__)
               if hasattr(importlib.import_module(f"mgssl.tools.{m.name}"), "main"))


@pytest.mark.parametrize("name", TOOLS)
def test_main_returns_an_exit_code(name):
    main = importlib.import_module(f"mgssl.tools.{name}").main
    assert inspect.signature(main).return_annotation is int
    source = inspect.getsource(importlib.import_module(f"mgssl.tools.{name}"))
    assert 'if __name__ == "__main__":\n    sys.exit(main())' in source

