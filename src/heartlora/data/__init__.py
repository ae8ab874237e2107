"""Tasks and the input pipeline: the registry, VTAB-1K folders, few-shot, offline real data, generated structured
tasks, the uint8 tensor cache and export to the VTAB-1K layout."""

from heartlora.data.base import ArrayTask, Task
from heartlora.data.registry import TaskInfo, get_task, list_tasks, register_task

__all__ = ["ArrayTask", "Task", "TaskInfo", "get_task", "list_tasks", "register_task"]
