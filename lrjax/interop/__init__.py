"""Interoperability with other libraries' adapter formats (see :mod:`lrjax.interop.peft`)."""
from lrjax.interop.peft import default_module_name, export_peft, import_peft, pissa_to_lora

__all__ = ["export_peft", "import_peft", "pissa_to_lora", "default_module_name"]
