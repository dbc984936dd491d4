"""The offline demo: DigitsDG-mini data (:mod:`demo.data`), the tiny CLIP (:mod:`demo.pretrain`, weights shipped in
``demo/weights/``) and the Setup-II benchmark that runs every trainer on them (:mod:`demo.run`; ``python -m demo``
from ``CoOp/``), with its report (:mod:`demo.report`), verdict rule (:mod:`demo.verdict`) and the comparison of
two runs (:mod:`demo.compare`)."""
