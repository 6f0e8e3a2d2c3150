//! Validated mode's keys: stateless cookies that prove a source receives at its address (as a
//! DTLS cookie or a QUIC Retry token does), and per-address tokens that every later datagram
//! carries. HMAC-SHA256 under a random per-server secret; nothing is stored per source.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::protocol::TOKEN_LEN;

/// A cookie is good for the period it was made in and the next one: 30 to 60 seconds.
const COOKIE_PERIOD: Duration = Duration::from_secs(30);

pub struct Keys {
    secret: [u8; 32],
    epoch: Instant,
}

/// A cookie or a token as sent: 16 bytes of MAC, hex-encoded.
pub type Hex = [u8; TOKEN_LEN];

impl Keys {
    pub fn new() -> std::io::Result<Keys> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(std::io::Error::other)?;
        Ok(Keys {
            secret,
            epoch: Instant::now(),
        })
    }

    fn mac(&self, label: &[u8], addr: SocketAddr, period: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(label);
        match addr.ip().to_canonical() {
            std::net::IpAddr::V4(ip) => mac.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.update(&addr.port().to_be_bytes());
        mac.update(&period.to_be_bytes());
        mac
    }

    fn hex(mac: Hmac<Sha256>) -> Hex {
        let mut out = [0u8; TOKEN_LEN];
        hex::encode_to_slice(&mac.finalize().into_bytes()[..TOKEN_LEN / 2], &mut out)
            .expect("sizes match");
        out
    }

    fn verify(mac: Hmac<Sha256>, hex: &[u8]) -> bool {
        let mut raw = [0u8; TOKEN_LEN / 2];
        hex::decode_to_slice(hex, &mut raw).is_ok() && mac.verify_truncated_left(&raw).is_ok()
    }

    fn period(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_secs() / COOKIE_PERIOD.as_secs()) + 1
    }

    /// The cookie a challenge to `addr` carries at `now`.
    pub fn cookie(&self, addr: SocketAddr, now: Instant) -> Hex {
        Self::hex(self.mac(b"cookie", addr, self.period(now)))
    }

    /// Whether `hex` is a cookie this server gave `addr` in this period or the last.
    pub fn check_cookie(&self, addr: SocketAddr, hex: &[u8], now: Instant) -> bool {
        let period = self.period(now);
        (period - 1..=period).any(|p| Self::verify(self.mac(b"cookie", addr, p), hex))
    }

    /// The token of a validated `addr`, the same for as long as this server runs.
    pub fn token(&self, addr: SocketAddr) -> Hex {
        Self::hex(self.mac(b"token", addr, 0))
    }

    /// Whether `hex` is `addr`'s token (compared in constant time).
    pub fn check_token(&self, addr: SocketAddr, hex: &[u8]) -> bool {
        Self::verify(self.mac(b"token", addr, 0), hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_tokens_bind_the_address_and_expire() {
        let keys = Keys::new().unwrap();
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let t0 = keys.epoch;
        let cookie = keys.cookie(a, t0);
        assert!(keys.check_cookie(a, &cookie, t0));
        assert!(keys.check_cookie(a, &cookie, t0 + COOKIE_PERIOD)); // the next period too
        assert!(!keys.check_cookie(a, &cookie, t0 + COOKIE_PERIOD * 2)); // not after
        assert!(!keys.check_cookie(b, &cookie, t0));
        let token = keys.token(a);
        assert!(keys.check_token(a, &token));
        assert!(!keys.check_token(b, &token));
        assert!(!keys.check_token(a, &cookie));
        assert!(!keys.check_token(a, b"zz"));
        // Another server (another secret) accepts none of them.
        let other = Keys::new().unwrap();
        assert!(!other.check_token(a, &token));
        assert!(!other.check_cookie(a, &cookie, t0));
    }
}
