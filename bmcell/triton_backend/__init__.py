"""Source of the generic Triton python-backend ``model.py`` that serves a TorchScript version.

The file ``model.py`` here is package data, not imported by bmcell: ``bmcell.modelrepo``
copies its bytes into each exported version directory. It runs inside Triton's python
backend stub, which has ``triton_python_backend_utils`` but not bmcell.
"""
