"""cdc_serve_training: the training side of cdc-serve (torch, torchvision).

Installed from the repository's ``training/`` folder under the import name
``cdc_serve_training``. Modules, in the order a newcomer reads them: ``config``,
``data``, ``augment``, ``backbones``, ``kmeans``, ``heads``, ``init``, ``moco``,
``cdc``, ``ruc``, ``checkpoint``, ``evaluation``, ``pipeline``, ``ablations``.
"""
