"""Tasks and the input pipeline: the registry, VTAB-1K folders, few-shot, offline real data, generated structured
tasks, the uint8 tensor cache and export to the VTAB-1K layout.

>>> from heartlora.data import get_task
>>> task = get_task("fashion_mnist")                        # or "vtab:/path/to/cifar", "fashion_mnist@4shot"
>>> images, labels = task.load("train800", img_size=112)    # uint8 (800, 3, 112, 112), int64 (800,)
"""

from heartlora.data.base import ArrayTask, Task
from heartlora.data.export import export_task
from heartlora.data.fewshot import FewShotTask
from heartlora.data.registry import TaskInfo, get_task, list_tasks, register_task
from heartlora.data.vtab import VtabFolderTask

# Imported for their @register_task side effect.
from heartlora.data import generated, offline  # noqa: E402,F401  (isort: skip)

__all__ = ["ArrayTask", "FewShotTask", "Task", "TaskInfo", "VtabFolderTask", "export_task", "get_task",
           "list_tasks", "register_task"]
