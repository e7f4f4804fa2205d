//! The command queue into the store thread: a channel whose senders wake the thread only when
//! it must act sooner than it already will.
//!
//! Each command comes with the latest moment the thread must see it (`by`). The thread, when it
//! sleeps, says until when ([`Receiver::recv_until`]); a sender wakes it only for a command due
//! before that. So the rows of a device that publishes now and then, an ack or a drop count join
//! the queue without a wake-up (a futex call and two context switches each), and the thread
//! takes them all when it wakes for its next commit: group commit is also group wake-up. A
//! command someone waits for ([`Wake::Now`]: a `Now` append, a fetch, stats, close) wakes it at
//! once. The receiver gets each command with its due time, so a deadline counts from when the
//! command was sent, not from when the thread took it. Like `std::sync::mpsc`: sending fails once the receiver is gone, and the receiver sees
//! [`Recv::Disconnected`] once every sender is gone and the queue is empty.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::{Command, ACK_COMMIT_ROWS};

/// When the store thread must see a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wake {
    /// At once: someone waits for the answer.
    Now,
    /// By this moment (the command's own deadline).
    By(Instant),
}

struct State {
    cmds: VecDeque<(Command, Wake)>,
    /// Ack ids among `cmds`: at [`ACK_COMMIT_ROWS`] they wake the thread, whatever their due
    /// time, so a fast drain never holds more uncommitted deletes than that.
    acks: usize,
    senders: usize,
    receiver_alive: bool,
    /// Set while the thread sleeps: until when.
    sleeping_until: Option<Instant>,
}

struct Queue {
    state: Mutex<State>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves nothing half-done (every critical section is
        // a push, a pop or a counter), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A new queue: its only sender and its receiver.
pub(super) fn queue() -> (Sender, Receiver) {
    let q = Arc::new(Queue {
        state: Mutex::new(State {
            cmds: VecDeque::new(),
            acks: 0,
            senders: 1,
            receiver_alive: true,
            sleeping_until: None,
        }),
        ready: Condvar::new(),
    });
    (Sender { q: q.clone() }, Receiver { q })
}

pub(super) struct Sender {
    q: Arc<Queue>,
}

impl Sender {
    /// Queues `cmd`, waking the thread if it sleeps past `wake`. Gives the command back when
    /// the thread is gone.
    pub fn send(&self, cmd: Command, wake: Wake) -> Result<(), Command> {
        let mut st = self.q.lock();
        if !st.receiver_alive {
            return Err(cmd);
        }
        if let Command::Ack(ids) = &cmd {
            st.acks += ids.len();
        }
        let many_acks = st.acks >= ACK_COMMIT_ROWS;
        st.cmds.push_back((cmd, wake));
        let wake_now = match (st.sleeping_until, wake) {
            // Awake: it looks at the queue before it sleeps again.
            (None, _) => false,
            (Some(_), Wake::Now) => true,
            (Some(_), _) if many_acks => true,
            (Some(until), Wake::By(by)) => by < until,
        };
        if wake_now {
            st.sleeping_until = None;
            drop(st);
            self.q.ready.notify_one();
        }
        Ok(())
    }
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.q.lock().senders += 1;
        Sender { q: self.q.clone() }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut st = self.q.lock();
        st.senders -= 1;
        if st.senders == 0 {
            drop(st);
            self.q.ready.notify_one();
        }
    }
}

/// What [`Receiver::recv_until`] found.
pub(super) enum Recv {
    /// A command and when it is due (its sender's deadline, not when it was taken).
    Command(Command, Wake),
    Timeout,
    /// Every sender is gone and nothing is queued.
    Disconnected,
}

pub(super) struct Receiver {
    q: Arc<Queue>,
}

impl State {
    fn pop(&mut self) -> Option<(Command, Wake)> {
        let next = self.cmds.pop_front();
        if let Some((Command::Ack(ids), _)) = &next {
            self.acks -= ids.len();
        }
        next
    }
}

impl Receiver {
    /// The next queued command and when it was due, without waiting.
    pub fn try_recv(&self) -> Option<(Command, Wake)> {
        self.q.lock().pop()
    }

    /// The next command: one queued already, or the first that must be seen before `until`;
    /// at `until`, whatever was queued meanwhile (or [`Recv::Timeout`]).
    pub fn recv_until(&self, until: Instant) -> Recv {
        let mut st = self.q.lock();
        loop {
            if let Some((cmd, wake)) = st.pop() {
                st.sleeping_until = None;
                return Recv::Command(cmd, wake);
            }
            if st.senders == 0 {
                return Recv::Disconnected;
            }
            let now = Instant::now();
            if now >= until {
                st.sleeping_until = None;
                return Recv::Timeout;
            }
            st.sleeping_until = Some(until);
            st = self
                .q
                .ready
                .wait_timeout(st, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if st.sleeping_until.is_none() {
                // Woken on purpose: take what is queued now, even if it is not due yet.
                if let Some((cmd, wake)) = st.pop() {
                    return Recv::Command(cmd, wake);
                }
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut st = self.q.lock();
        st.receiver_alive = false;
        // Their reply channels close: each waiting caller learns the store stopped.
        let cmds = std::mem::take(&mut st.cmds);
        drop(st);
        drop(cmds);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ack(id: i64) -> Command {
        Command::Ack(vec![id])
    }

    fn acked(r: Recv) -> Option<i64> {
        match r {
            Recv::Command(Command::Ack(ids), _) => ids.first().copied(),
            _ => None,
        }
    }

    fn send(tx: &Sender, cmd: Command, wake: Wake) {
        tx.send(cmd, wake).map_err(|_| ()).expect("receiver alive");
    }

    /// A thread sleeps in `recv_until` for `sleep`; 50 ms later `cmd` is sent with `wake`.
    /// Returns how long the thread slept and the first ack id it got.
    fn sleeper_gets(
        sleep: Duration,
        cmd: Command,
        wake: impl FnOnce() -> Wake,
    ) -> (Duration, Option<i64>) {
        let (tx, rx) = queue();
        let t = std::thread::spawn(move || {
            let started = Instant::now();
            let got = rx.recv_until(Instant::now() + sleep);
            (started.elapsed(), acked(got))
        });
        std::thread::sleep(Duration::from_millis(50));
        send(&tx, cmd, wake());
        t.join().expect("thread")
    }

    #[test]
    fn a_command_due_later_than_the_sleep_does_not_wake_the_thread_but_is_taken_at_its_end() {
        let sleep = Duration::from_millis(300);
        let (took, got) = sleeper_gets(sleep, ack(7), || {
            Wake::By(Instant::now() + Duration::from_secs(60))
        });
        assert_eq!(got, Some(7));
        assert!(took >= sleep, "woken early, after {took:?}");
    }

    #[test]
    fn a_command_due_before_the_end_of_the_sleep_wakes_the_thread() {
        let (took, got) = sleeper_gets(Duration::from_secs(60), ack(8), || Wake::Now);
        assert_eq!(got, Some(8));
        assert!(took < Duration::from_secs(30), "not woken: {took:?}");
    }

    #[test]
    fn the_receiver_sees_queued_commands_then_disconnected_once_every_sender_is_gone() {
        let (tx, rx) = queue();
        let tx2 = tx.clone();
        send(&tx, ack(1), Wake::By(Instant::now()));
        drop(tx);
        drop(tx2);
        let until = Instant::now() + Duration::from_secs(60);
        assert_eq!(acked(rx.recv_until(until)), Some(1));
        assert!(matches!(rx.recv_until(until), Recv::Disconnected));
    }

    #[test]
    fn each_command_comes_with_the_due_time_its_sender_gave_not_when_it_was_taken() {
        let (tx, rx) = queue();
        let due = Instant::now() + Duration::from_millis(80);
        send(&tx, ack(3), Wake::By(due));
        std::thread::sleep(Duration::from_millis(20));
        match rx.recv_until(Instant::now() + Duration::from_secs(60)) {
            Recv::Command(Command::Ack(ids), wake) => {
                assert_eq!(ids, [3]);
                assert_eq!(wake, Wake::By(due));
            }
            _ => panic!("the queued ack"),
        }
    }

    #[test]
    fn enough_acks_wake_the_thread_whatever_their_due_time() {
        let ids: Vec<i64> = (0..ACK_COMMIT_ROWS as i64).collect();
        let (took, got) = sleeper_gets(Duration::from_secs(60), Command::Ack(ids), || {
            Wake::By(Instant::now() + Duration::from_secs(120))
        });
        assert_eq!(got, Some(0));
        assert!(took < Duration::from_secs(30), "not woken: {took:?}");
    }

    #[test]
    fn sending_fails_once_the_receiver_is_gone() {
        let (tx, rx) = queue();
        drop(rx);
        assert!(tx.send(ack(1), Wake::Now).is_err());
    }
}
