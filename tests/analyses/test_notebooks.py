"""The analysis notebooks run headless (nbclient + ipykernel) on a tiny random checkpoint,
render their figures inline, and match the generator that writes them."""

import base64
import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from segcompass_tiny import tiny_checkpoint  # noqa: F401 (session fixture)

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ("figure4_activation_patterns.ipynb", "figure5_instance_coverage.ipynb", "figure8_correlation.ipynb",
         "faithfulness.ipynb")


def with_parameters(notebook: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """A copy with a cell overriding `values` inserted after the `parameters` cell (papermill's way)."""
    notebook = nbformat.from_dict(notebook)
    [index] = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell["id"] = "injected-parameters"
    notebook.cells.insert(index + 1, cell)
    return notebook


def png_outputs(notebook: nbformat.NotebookNode) -> list[bytes]:
    return [base64.b64decode(out["data"]["image/png"]) for cell in notebook.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


def load_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_match_their_generator(tmp_path):
    load_generator().main(tmp_path)
    for name in NAMES:
        fresh, committed = nbformat.read(tmp_path / name, 4), nbformat.read(NOTEBOOKS / name, 4)
        assert [c.source for c in fresh.cells] == [c.source for c in committed.cells], \
            f"{name} is stale: run python notebooks/make_notebooks.py"


@pytest.fixture(scope="module")
def kernel():
    """One kernel for the four notebooks: its ~5 s of imports (torch, transformers) are paid once;
    each notebook starts with `%reset -f`, so none can lean on another's variables."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(NOTEBOOKS))
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_headless(name, kernel, tiny_checkpoint):
    notebook = with_parameters(nbformat.read(NOTEBOOKS / name, 4),
                               {"CHECKPOINT": str(tiny_checkpoint), "N_SAMPLES": 4, "MIN_IOU": 0.0,
                                "MAX_ITEMS": 2, "KS": (0, 1, 5), "N_DRAWS": 1})
    reset = nbformat.v4.new_code_cell("%reset -f")
    reset["id"] = "injected-reset"
    notebook.cells.insert(0, reset)
    client = NotebookClient(notebook, km=kernel[0], timeout=120, kernel_name="python3")
    client.kc = kernel[1]
    client.execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: {errors}"
    pngs = png_outputs(notebook)
    assert pngs and all(p.startswith(b"\x89PNG") for p in pngs), f"{name} rendered no figure"
