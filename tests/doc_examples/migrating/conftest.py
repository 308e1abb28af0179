# The one line the README asks for.
pytest_plugins = ["post_response.pytest_plugin"]
