"""Lazy imports: the CLI's fast paths never import torch; hf_sparse's models still register with the Auto classes.

Times are measured in ``bench/bench_startup.py``; these tests pin what makes them short.
"""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

HEAVY = ("torch", "transformers", "timm", "datasets")


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_import_and_cli_parser_import_nothing_heavy():
    assert imported_after("import hf_sparse") == set()
    assert imported_after("from hf_sparse.cli import build_parser; build_parser()") == set()
    assert imported_after("import hf_sparse.checkpoint.save_and_load") == set()  # what `inspect` needs


def test_public_names_load_on_first_use_and_register_the_models():
    code = ("import hf_sparse, transformers\n"
            "assert {'Recipe', 'RecipeError', 'SparseTrainer', 'Sparsifier', 'SparsityConfig', '__version__',"
            " 'load_recipe', 'load_sparse', 'push_to_hub', 'save_sparse_checkpoint'} <= set(hf_sparse.__all__)\n"
            "from hf_sparse import SparseTrainer, load_sparse\n"
            "transformers.AutoConfig.for_model('hf_sparse_lenet')  # registered by hf_sparse.models\n")
    assert {"torch", "transformers"} <= imported_after(code)
    # transformers imported first: `import hf_sparse` registers the models at once (for_model raises
    # otherwise), pulling in torch for them but neither timm nor datasets
    registered = "import transformers, hf_sparse\ntransformers.AutoConfig.for_model('hf_sparse_lenet')"
    assert imported_after(registered) == {"torch", "transformers"}
