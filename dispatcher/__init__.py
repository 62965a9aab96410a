"""snaphook's dispatcher: CloudEvents in, blueprints planned, hook functions run.

The public face is small: build the aiohttp application from settings.
"""

from dispatcher.app import create_app
from dispatcher.settings import Settings

__all__ = ["Settings", "create_app"]
