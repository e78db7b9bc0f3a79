"""The main job: train a small Flax transformer language model with Muon, on a CPU, in a minute.

Run ``python -m optax_ext.demo --help`` for the flags. The corpus is built from the
docstrings of Python's own standard library, so nothing is downloaded; the model is a
character-level causal transformer written with ``flax.linen``.

One concern a module: :mod:`~optax_ext.demo.data` (the corpus),
:mod:`~optax_ext.demo.model` (the transformer and its loss),
:mod:`~optax_ext.demo.recipes` (each optimizer builds itself),
:mod:`~optax_ext.demo.loop` (training), :mod:`~optax_ext.demo.report` (recommendations
and the plot) and :mod:`~optax_ext.demo.cli` (the command line).
"""

from optax_ext.demo.cli import build_parser, main
from optax_ext.demo.data import CORPUS_MODULES, CharData, load_corpus
from optax_ext.demo.loop import History, train
from optax_ext.demo.model import Block, CharTransformer, lm_loss
from optax_ext.demo.recipes import RECIPES, Recipe, accumulated, make_optimizer
from optax_ext.demo.report import print_recommendations, recommendations, save_plot

__all__ = [
    "Block",
    "CORPUS_MODULES",
    "CharData",
    "CharTransformer",
    "History",
    "RECIPES",
    "Recipe",
    "accumulated",
    "build_parser",
    "load_corpus",
    "lm_loss",
    "main",
    "make_optimizer",
    "print_recommendations",
    "recommendations",
    "save_plot",
    "train",
]
