import pytest

from harness import Redis, Server


@pytest.fixture
def make_server(tmp_path):
    """Builds (not starts) servers in their own directories; stops them all."""
    servers = []

    def make(**sections):
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        servers.append(Server(workdir, **sections))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server):
    return make_server().start()


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path)
    yield r
    r.stop()
