"""The offline demo: DigitsDG-mini data (:mod:`demo.data`), the tiny CLIP (:mod:`demo.pretrain`) and the
Setup-II benchmark that runs every trainer on them (:mod:`demo.run`; ``python -m demo`` from ``CoOp/``)."""
