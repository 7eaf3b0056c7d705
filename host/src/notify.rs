//! The service manager's notification protocol (sd_notify(3)), only when `NOTIFY_SOCKET` is
//! set: `READY=1` once the daemon listens with its instances started, `STATUS=` lines,
//! `RELOADING=1` with `MONOTONIC_USEC=` in the same datagram then always `READY=1` again
//! (after a refused reload too), `STOPPING=1`, and `WATCHDOG=1` pings, which the supervisor's
//! loop sends — a stuck supervisor stops them.
//!
//! Datagrams go to the socket named by `NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket). A failed send is logged once at debug level and otherwise ignored: the service
//! manager is not the daemon's to crash for.

use std::{
    os::unix::net::{SocketAddr, UnixDatagram},
    time::Duration,
};

/// Where notifications go; `None` when the daemon was not started by a service manager.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
    /// From `WATCHDOG_USEC` (when `WATCHDOG_PID` is unset or ours).
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier the environment asks for, if any.
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = path.to_string_lossy().into_owned();
        let address = match path.strip_prefix('@') {
            Some(name) => {
                <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)
            }
            None => SocketAddr::from_pathname(&path),
        };
        let (Ok(address), Ok(socket)) = (address, UnixDatagram::unbound()) else {
            tracing::warn!(notify_socket = %path, "NOTIFY_SOCKET is not a usable socket address; not notifying");
            return None;
        };
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0)
            .filter(|_| {
                std::env::var("WATCHDOG_PID")
                    .ok()
                    .is_none_or(|pid| pid.parse() == Ok(std::process::id()))
            })
            .map(Duration::from_micros);
        Some(Self {
            socket,
            address,
            watchdog,
        })
    }

    /// The interval the service manager expects pings within, if it asked for them.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one datagram of `KEY=VALUE` lines.
    pub fn send(&self, lines: &[&str]) {
        let message = lines.join("\n");
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.address) {
            tracing::debug!(error = %e, "cannot notify the service manager");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&["READY=1", &format!("STATUS={status}")]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[&format!("STATUS={status}")]);
    }

    /// A reload starts: `RELOADING=1` and the monotonic clock, in one datagram.
    pub fn reloading(&self) {
        self.send(&[
            "RELOADING=1",
            &format!("MONOTONIC_USEC={}", monotonic_usec()),
        ]);
    }

    pub fn stopping(&self, status: &str) {
        self.send(&["STOPPING=1", &format!("STATUS={status}")]);
    }

    pub fn watchdog_ping(&self) {
        self.send(&["WATCHDOG=1"]);
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC=` wants it.
fn monotonic_usec() -> u128 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    now.tv_sec as u128 * 1_000_000 + now.tv_nsec as u128 / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_moves_forward_in_microseconds() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_usec();
        assert!(b >= a + 2000 && b < a + 2_000_000, "{a} {b}");
    }
}
