"""
The study around the losses, over finished runs' files: Fig. 4 (``fig4``), sweep plans
(``sweep``), Table 2 per run and per setting (``tables``), intervals from a paired bootstrap
(``intervals``), the proxy's calibration against RetinaNet's Table 1 (``table1``), training
curves (``curves``), and backbone pretraining without real images (``pretrain``). The tools in
tools/ are the commands over them.
"""
