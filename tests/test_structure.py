"""The house rules that keep the package easy to live in: the CLI and the app are leaves, and
`import dit_attn` stays light."""
import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dit_attn"
LEAVES = ("cli", "app")


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of every module a file imports, function-local imports included."""
    package = ".".join(("dit_attn", *path.relative_to(PACKAGE).with_suffix("").parts))
    if path.name == "__init__.py":
        package += ".__init__"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: -node.level] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_under_dit_attn_imports_the_cli_or_the_app():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        own = path.relative_to(PACKAGE).parts[0]
        if own in LEAVES:
            continue
        for name in imported_modules(path):
            if any(name == f"dit_attn.{leaf}" or name.startswith(f"dit_attn.{leaf}.") for leaf in LEAVES):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, offenders


def test_the_import_check_sees_relative_and_local_imports(tmp_path, monkeypatch):
    # the check above must catch the forms that hid the old cycle: relative and function-local imports
    fake = PACKAGE / "guidance" / "_structure_probe.py"
    fake.write_text("def f():\n    from ..cli import main\n    from ..app.models import X\n")
    try:
        names = imported_modules(fake)
    finally:
        fake.unlink()
    assert "dit_attn.cli.main" in names and "dit_attn.app.models" in names


def test_import_dit_attn_loads_neither_torch_nor_diffusers():
    code = ("import sys, dit_attn as da; e = da.HeadGuidance(heads=['L1H2']); import dit_attn.cli; "
            "dit_attn.cli.build_parser(); print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_benchmark_script_shadows_an_installed_module():
    """`python benchmarks/X.py` puts its folder first on sys.path: a script named as a module that diffusers or its
    dependencies import (e.g. `kernels`, which transformers imports) would be imported in its place."""
    from importlib.metadata import packages_distributions

    installed = set(packages_distributions()) | set(sys.stdlib_module_names)
    scripts = PACKAGE.parent / "benchmarks"
    clashes = sorted(p.relative_to(scripts).as_posix() for p in scripts.rglob("*.py") if p.stem in installed)
    assert not clashes, f"rename {clashes}: each shadows an installed module of that name"
