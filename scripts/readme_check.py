#!/usr/bin/env python3
"""Runs the documentation's commands as a newcomer would, so a doc that lies
fails CI.

  readme_check.py test-command   print the README's second command (.ci/run runs it)
  readme_check.py run            the README's first command, then its tour
  readme_check.py run-marked F.. every ```sh block after a `<!-- ci: run -->` line in each F

A session: the server command is started (its own process group), /healthz is
awaited, then each line runs in order. In a marked block the server is its
first background line running `serve`; lines before it run first. A line
ending in `&` runs in the background; a `mosquitto_sub ... -t
<prefix>/user/<id> &` is awaited until the server reports that user
connected. `VAR=$(command)` sets VAR for the lines after it; a heredoc
(`cat > f <<'EOF'` ... `EOF`) runs as one command. A `# prints: X` comment
means the line's output (stdout, or stderr when stdout is empty) must be
exactly X, and `# fails, prints: X` that it also exits non-zero; a
`# mosquitto_sub prints X` line means the last background mosquitto_sub must
print X. Then the server is stopped with SIGTERM and must exit 0, having
logged no ERROR and no WARN other than the deliberate auth.mode = none one.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_WAIT = 1800  # a first `cargo run --release` builds everything
WAIT = 30
ALLOWED_WARNINGS = ("auth.mode = none",)


class Fail(Exception):
    pass


def sh_blocks(text):
    """(index of the line before the block, block lines) for each ```sh block."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            j = lines.index("```", i + 1)
            out.append((i - 1, lines[i + 1 : j]))
            i = j
        i += 1
    return out


def section(text, heading):
    start = text.index("\n## " + heading + "\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def two_commands():
    blocks = [b for _, b in sh_blocks(section(readme(), "The two commands"))]
    if len(blocks) != 2 or any(len(b) != 1 for b in blocks):
        raise Fail("README 'The two commands' must hold two one-line sh blocks")
    return blocks[0][0], blocks[1][0]


def split_comment(line):
    """The command and its trailing `# ...` comment (a # outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i].strip(), line[i + 1 :].strip()
    return line.strip(), ""


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


def wait_for(what, check, seconds, alive=None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        if alive is not None and alive.poll() is not None:
            raise Fail(f"the server exited ({alive.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise Fail(f"timed out after {seconds} s waiting for {what}")


class Session:
    def __init__(self, serve, workdir, env):
        self.env = env
        self.http = "127.0.0.1:8090"
        m = re.search(r"PUSHBRIDGE_HTTP__LISTEN=(\S+)", serve)
        if m:
            self.http = m.group(1)
        if http_get(f"http://{self.http}/healthz")[0] is not None:
            raise Fail(f"something already answers on {self.http}: stop it first")
        self.workdir = workdir
        self.log_path = os.path.join(workdir, "server.log")
        self.log = open(self.log_path, "w")
        self.background = []
        print(f"$ {serve}", flush=True)
        # bash runs a lone command in place, so the signal reaches the server
        self.server = subprocess.Popen(
            ["bash", "-c", serve], cwd=ROOT, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def healthy(self):
        wait_for(f"http://{self.http}/healthz",
                 lambda: http_get(f"http://{self.http}/healthz")[0] == 200,
                 BUILD_WAIT, self.server)

    def line(self, line):
        cmd, comment = split_comment(line)
        if not cmd:
            m = re.match(r"mosquitto_sub prints (.*)$", comment)
            if m:
                self.expect_sub(m.group(1).strip())
            return
        print(f"$ {cmd}", flush=True)
        if cmd.endswith("&"):
            return self.start_background(cmd[:-1].strip())
        run_line(cmd, comment, self.env)

    def start_background(self, cmd):
        path = os.path.join(self.workdir, f"bg{len(self.background)}.out")
        proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=ROOT,
                                stdout=open(path, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True, env=self.env)
        self.background.append((cmd, proc, path))
        m = re.search(r"-t \S+/user/(\S+)", cmd)
        if cmd.startswith("mosquitto_sub") and m:
            url = f"http://{self.http}/v1/users/{m.group(1)}/presence"

            def connected():
                status, body = http_get(url)
                return status == 200 and json.loads(body).get("connected") is True

            wait_for(f"{cmd} to be subscribed", connected, WAIT, proc)

    def expect_sub(self, want):
        subs = [b for b in self.background if b[0].startswith("mosquitto_sub")]
        if not subs:
            raise Fail(f"'mosquitto_sub prints {want}' but no mosquitto_sub runs")
        cmd, _, path = subs[-1]

        def printed():
            with open(path) as f:
                return want in (l.strip() for l in f)

        try:
            wait_for(f"`{cmd}` to print {want}", printed, WAIT)
        except Fail as e:
            with open(path) as f:
                raise Fail(f"{e}; it printed: {f.read()!r}") from None
        print(f"  (mosquitto_sub printed {want})", flush=True)

    def stop(self):
        for _, proc, _ in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(WAIT)
        if self.server.poll() is not None:
            raise Fail(f"the server had already exited ({self.server.returncode})")
        self.server.send_signal(signal.SIGTERM)
        code = self.server.wait(60)
        if code != 0:
            raise Fail(f"the server exited {code} on SIGTERM, not 0")
        self.log.close()
        with open(self.log_path) as f:
            bad = [l for l in f if re.search(r"\b(ERROR|WARN)\b", l)
                   and not any(a in l for a in ALLOWED_WARNINGS)]
        if bad:
            raise Fail("the server logged:\n" + "".join(bad))
        print("  server stopped with SIGTERM, exit 0, no unexpected ERROR/WARN", flush=True)

    def kill(self):
        for _, proc, _ in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGKILL)
        self.log.close()
        with open(self.log_path) as f:
            sys.stderr.write("--- server log (last 40 lines) ---\n")
            sys.stderr.writelines(f.readlines()[-40:])


def run_line(cmd, comment, env):
    """A foreground line: `VAR=$(command)` sets VAR in `env`; anything else
    runs and is checked against its `# prints:` / `# fails, prints:` comment."""
    assign = re.fullmatch(r"(\w+)=\$\((.*)\)", cmd, re.S)
    run = assign.group(2) if assign else cmd
    out = subprocess.run(["bash", "-c", run], cwd=ROOT, capture_output=True,
                         text=True, timeout=BUILD_WAIT, env=env)
    fails = comment.startswith("fails")
    if (out.returncode != 0) != fails:
        raise Fail(f"`{cmd}` exited {out.returncode}: {out.stdout}{out.stderr}")
    if assign:
        env[assign.group(1)] = out.stdout.strip()
    m = re.match(r"(?:fails, )?prints: (.*)$", comment)
    shown = (out.stdout.strip() or out.stderr.strip())
    if m and shown != m.group(1).strip():
        raise Fail(f"`{cmd}` printed {shown!r}, the doc says {m.group(1)!r}")


def joined(lines):
    """The block's lines, each heredoc joined into the line that opens it."""
    out, i = [], 0
    while i < len(lines):
        m = re.search(r"<<-?'?(\w+)'?\s*$", lines[i])
        if m:
            end = lines.index(m.group(1), i + 1)
            out.append("\n".join(lines[i : end + 1]))
            i = end + 1
        else:
            out.append(lines[i])
            i += 1
    return out


def session(serve, lines, env=None):
    env = dict(os.environ) if env is None else env
    with tempfile.TemporaryDirectory() as workdir:
        s = Session(serve, workdir, env)
        try:
            s.healthy()
            for line in lines:
                s.line(line)
            s.stop()
        except BaseException:
            s.kill()
            raise


def run_readme():
    serve, _ = two_commands()
    tour = [b for _, b in sh_blocks(section(readme(), "A five-minute tour"))]
    if not tour:
        raise Fail("README 'A five-minute tour' has no sh block")
    session(serve, joined(tour[0]))


def run_marked(path):
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    marker_lines = text.split("\n")
    blocks = [b for before, b in sh_blocks(text)
              if before >= 0 and marker_lines[before].strip() == "<!-- ci: run -->"]
    if not blocks:
        raise Fail(f"{path}: no sh block after a `<!-- ci: run -->` line")
    for block in blocks:
        lines = joined(block)
        at = next((i for i, l in enumerate(lines)
                   if split_comment(l)[0].endswith("&") and " serve" in l), None)
        if at is None:
            raise Fail(f"{path}: a marked block starts a server with `... serve ... &`")
        env = dict(os.environ)
        for line in lines[:at]:
            print(f"$ {line}", flush=True)
            run_line(*split_comment(line), env)
        session(split_comment(lines[at])[0][:-1].strip(), lines[at + 1 :], env)


def main(argv):
    try:
        if argv[1:] == ["test-command"]:
            print(two_commands()[1])
        elif argv[1:] == ["run"]:
            run_readme()
            print("README: first command and tour OK")
        elif len(argv) >= 3 and argv[1] == "run-marked":
            for path in argv[2:]:
                run_marked(path)
                print(f"{path}: marked blocks OK")
        else:
            sys.exit(__doc__)
    except Fail as e:
        sys.exit(f"readme_check: {e}")


if __name__ == "__main__":
    main(sys.argv)
