"""`rlm view`: a read-only web viewer of the RLM trajectories in a directory.

`create_app(trajectory_dir, settings)` is the Starlette app; `TrajectoryDir` reads the files
`host_poller.rlm.trajectory` writes, `RunIndex` lists runs, `RunTree` assembles one run.
"""

from host_poller.viewer.app import create_app
from host_poller.viewer.reader import TrajectoryDir
from host_poller.viewer.runs import RunIndex
from host_poller.viewer.settings import ViewerSettings
from host_poller.viewer.tree import RunTree

__all__ = ["RunIndex", "RunTree", "TrajectoryDir", "ViewerSettings", "create_app"]
