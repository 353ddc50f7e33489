//! One backend connection: read frames, queue pushes, answer status bytes.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Shared;
use crate::intake::{Intake, IntakeError, Queue, Refused, StreamWriter, Ticket};
use crate::push::Push;
use crate::wire::frame::{self, FrameError, Status};

/// The most one read takes (more only to finish a bigger frame): with
/// backends held back, each turn reads about the same, so no backend
/// drains faster than another because its buffer happened to grow.
const READ_CHUNK: usize = 16 * 1024;

/// A backend's socket with what was read and not yet handled, and the
/// status bytes not yet written (mini-redis's `Connection`, for frames).
struct Connection {
    socket: TcpStream,
    buf: BytesMut,
    replies: Vec<u8>,
    /// What the next read may take.
    limit: usize,
}

impl Connection {
    /// Reads more; `Ok(0)` at the end of the stream.
    async fn read(&mut self) -> std::io::Result<usize> {
        let limit = self.limit as u64;
        (&mut self.socket).take(limit).read_buf(&mut self.buf).await
    }

    /// The body of the next whole frame, `None` until one is buffered.
    fn frame(&mut self, max: u32) -> Result<Option<BytesMut>, FrameError> {
        Ok(frame::check(&self.buf, max)?.map(|len| self.buf.split_to(4 + len).split_off(4)))
    }

    fn reply(&mut self, status: Status) {
        self.replies.push(status as u8);
    }

    /// Writes the status bytes so far.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.replies.is_empty() {
            self.socket.write_all(&self.replies).await?;
            self.replies.clear();
        }
        Ok(())
    }

    /// Makes room for the rest of the frame being read (its length is known
    /// once 4 bytes are in), or a small chunk when between frames.
    fn reserve_for_next(&mut self, max_frame: u32) {
        let want = match self.buf.get(..4) {
            Some(head) => {
                let len = (&head[..]).get_u32().min(max_frame) as usize;
                (4 + len).saturating_sub(self.buf.len()).max(1)
            }
            None => READ_CHUNK,
        };
        self.buf.reserve(want);
        self.limit = want.max(READ_CHUNK);
    }
}

pub(crate) async fn handle(socket: TcpStream, shared: Shared) {
    let idle = Duration::from_secs(shared.settings.idle_timeout_secs);
    let mut conn = Connection {
        socket,
        buf: BytesMut::new(),
        replies: Vec::new(),
        limit: READ_CHUNK,
    };
    conn.buf.reserve(READ_CHUNK);
    let mut burst = Burst::default();
    let ticket = Arc::<Ticket>::default();
    // Reset only by whole frames, so trickling bytes cannot hold a slot.
    let mut deadline = Instant::now() + idle;
    debug!("backend connected");
    loop {
        if let Intake::Memory(queue) = &shared.intake {
            let held = Instant::now();
            tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                () = queue.admitted(&ticket) => {}
            }
            shared.stats.stages.admission.observe(held.elapsed());
        }
        let read = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            read = tokio::time::timeout_at(deadline, conn.read()) => read,
        };
        let n = match read {
            Err(_) => {
                info!(
                    idle_secs = idle.as_secs(),
                    "closing idle backend connection"
                );
                break;
            }
            Ok(Err(e)) => {
                debug!(error = %e, "backend read failed");
                break;
            }
            Ok(Ok(n)) => n,
        };
        let eof = n == 0;
        let (mut keep, frames) = process(&mut conn, &mut burst, &shared).await;
        ticket.used(frames);
        if let Intake::Durable(stream) = &shared.intake {
            if !burst.is_empty() {
                keep &= commit(stream, &mut burst, &mut conn.replies, &shared).await;
            }
        }
        if frames > 0 {
            deadline = Instant::now() + idle;
        }
        if eof && !conn.buf.is_empty() && keep {
            info!(buffered = conn.buf.len(), "backend closed mid-frame");
            shared.stats.frames_rejected.inc();
            conn.reply(Status::Truncated);
        }
        if let Err(e) = conn.flush().await {
            debug!(error = %e, "backend write failed");
            break;
        }
        if eof || !keep {
            break;
        }
        conn.reserve_for_next(shared.settings.max_frame);
    }
    debug!("backend disconnected");
}

/// Handles every whole frame buffered, answering one status byte per frame
/// (none for keep-alives). Returns whether the connection stays open and
/// how many frames were handled.
async fn process(conn: &mut Connection, burst: &mut Burst, shared: &Shared) -> (bool, usize) {
    let mut frames = 0;
    loop {
        let body = match conn.frame(shared.settings.max_frame) {
            Ok(Some(body)) => body,
            Ok(None) => return (true, frames),
            Err(e) => {
                reject(&e, conn, shared);
                return (!e.is_fatal(), frames);
            }
        };
        frames += 1;
        if body.is_empty() {
            continue;
        }
        match (frame::parse_with_status(&body), &shared.intake) {
            (Ok((_, accepted)), Intake::Durable(_)) => {
                // Answered by `commit`, once the whole burst is in the stream.
                burst.add(&mut conn.replies, body.freeze(), accepted);
            }
            (Ok((push, accepted)), Intake::Memory(intake)) => {
                if !queue(intake, push, conn, shared).await {
                    conn.reply(Status::ShuttingDown);
                    return (false, frames);
                }
                shared.stats.pushes_accepted.inc();
                conn.reply(accepted);
            }
            (Err(e), _) => reject(&e, conn, shared),
        }
    }
}

/// Durable intake: the valid frames of one read, appended to the stream
/// together before any of them is answered.
#[derive(Default)]
struct Burst {
    bodies: Vec<Bytes>,
    /// Where each frame's status byte is in `replies`.
    slots: Vec<usize>,
}

impl Burst {
    /// `accepted` is the byte the frame gets once stored.
    fn add(&mut self, replies: &mut Vec<u8>, body: Bytes, accepted: Status) {
        self.slots.push(replies.len());
        replies.push(accepted as u8);
        self.bodies.push(body);
    }

    fn is_empty(&self) -> bool {
        self.bodies.is_empty()
    }
}

/// Appends the burst to the stream (one round trip) and sets its status
/// bytes: `0x00` (`0x0b` with options) once stored; `0x09` if Redis stayed
/// unreachable (the connection stays usable); `0x08` if the server stops
/// meanwhile (false: close).
async fn commit(
    stream: &StreamWriter,
    burst: &mut Burst,
    replies: &mut [u8],
    shared: &Shared,
) -> bool {
    let n = burst.bodies.len() as u64;
    let result = stream
        .append(&burst.bodies, stream.outage_wait(), &shared.shutdown)
        .await;
    let (status, keep) = match result {
        Ok(()) => {
            shared.stats.pushes_accepted.add(n);
            (None, true)
        }
        Err(IntakeError::ShuttingDown) => (Some(Status::ShuttingDown), false),
        Err(e) => {
            warn!(error = %e, frames = n, "pushes not accepted");
            shared.stats.intake_unavailable.add(n);
            (Some(Status::Unavailable), true)
        }
    };
    // Stored: each keeps the byte `add` gave it.
    if let Some(status) = status {
        for &slot in &burst.slots {
            replies[slot] = status as u8;
        }
    }
    burst.bodies.clear();
    burst.slots.clear();
    keep
}

/// Queues a push. With the queue full, the backend first gets the answers
/// so far, then waits for room; a stopping server does not wait (false).
async fn queue(intake: &Queue, push: Push, conn: &mut Connection, shared: &Shared) -> bool {
    let push = match intake.try_send(push) {
        Ok(()) => return true,
        Err(Refused::Closed) => return false,
        Err(Refused::Full(push)) => push,
    };
    if conn.flush().await.is_err() {
        return false;
    }
    tokio::select! {
        sent = intake.send(push) => sent,
        _ = shared.shutdown.cancelled() => false,
    }
}

fn reject(e: &FrameError, conn: &mut Connection, shared: &Shared) {
    info!(error = %e, status = e.status() as u8, "rejected frame");
    shared.stats.frames_rejected.inc();
    conn.reply(e.status());
}
