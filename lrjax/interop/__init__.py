"""Interoperability with other libraries' adapter formats (see :mod:`lrjax.interop.peft`) and
torch weights (:func:`params_from_torch`, see :mod:`lrjax.interop.torch_params`)."""
from lrjax.interop.peft import default_module_name, export_peft, import_peft, pissa_to_lora
from lrjax.interop.torch_params import params_from_torch

__all__ = ["export_peft", "import_peft", "pissa_to_lora", "default_module_name", "params_from_torch"]
