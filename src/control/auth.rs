//! Access control of the requests that change a pod (`/control/*` and `/reset`).
//!
//! A pod with a `token` setting accepts such a request when it carries either
//!
//! - `Authorization: Bearer <token>`, as the leader and the operator commands send it, or
//! - `X-Ochopod-Signature: <hex HMAC-SHA256 of the body, keyed with the token>`, which proves
//!   the caller knows the token without sending it.
//!
//! Both comparisons take the same time whatever the received value, so timing reveals nothing
//! about the token. The bearer form hashes both sides first, which also hides the
//! token's length.
//!
//! NOTE: a signature covers the body only, not the path or a timestamp, so anyone who captures a
//! signed request can replay its body to any verb of the same pod. Bind the control port to a
//! private network; the bearer form has the same exposure on plain HTTP.

use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::settings::Token;

/// Header carrying the HMAC-SHA256 of the request body, in hex.
pub const SIGNATURE_HEADER: &str = "X-Ochopod-Signature";

/// Reason a request is not authorized. The messages name what to send, never the expected value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "missing credentials: this pod requires its shared token; send `Authorization: Bearer \
         <token>` or `{SIGNATURE_HEADER}: <hex HMAC-SHA256 of the body keyed with the token>`"
    )]
    Missing,
    #[error("invalid credentials: the bearer token or the body signature does not match this pod's token")]
    Invalid,
}

/// Checks the credentials of a request against `token`; without a token every request passes.
pub fn authorize(token: Option<&Token>, headers: &HeaderMap, body: &[u8]) -> Result<(), AuthError> {
    let Some(token) = token else {
        return Ok(());
    };

    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|value| bearer_credentials(value.as_bytes()));
    let signature = headers.get(SIGNATURE_HEADER).map(|value| value.as_bytes());
    if bearer.is_none() && signature.is_none() {
        return Err(AuthError::Missing);
    }

    let bearer_ok = bearer.is_some_and(|received| bearer_matches(token, received));
    let signature_ok = signature.is_some_and(|received| signature_matches(token, body, received));
    if bearer_ok || signature_ok {
        Ok(())
    } else {
        Err(AuthError::Invalid)
    }
}

/// Tells whether a request carries a bearer token or a signature, valid or not.
pub fn carries_credentials(headers: &HeaderMap) -> bool {
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|value| bearer_credentials(value.as_bytes()));
    bearer.is_some() || headers.contains_key(SIGNATURE_HEADER)
}

/// Returns the hex HMAC-SHA256 of `body` keyed with `token`, the value of the signature header.
pub fn sign(token: &Token, body: &[u8]) -> String {
    let mut mac = keyed(token);
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Returns the credentials of an `Authorization: Bearer <credentials>` value; the scheme is
/// case-insensitive.
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    Some(value[SCHEME.len()..].trim_ascii())
}

fn bearer_matches(token: &Token, received: &[u8]) -> bool {
    let expected = Sha256::digest(token.expose().as_bytes());
    let received = Sha256::digest(received);
    expected.ct_eq(&received).into()
}

fn signature_matches(token: &Token, body: &[u8], received: &[u8]) -> bool {
    let Ok(received) = hex::decode(received.trim_ascii()) else {
        return false;
    };
    let mut mac = keyed(token);
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&received).is_ok()
}

fn keyed(token: &Token) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(token.expose().as_bytes())
        .expect("HMAC takes a key of any length")
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderName, HeaderValue};

    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn without_token_everything_passes() {
        assert_eq!(authorize(None, &headers(&[]), b"{}"), Ok(()));
    }

    #[test]
    fn bearer_accepted_in_any_case() {
        let token = Token::new(TOKEN);
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let value = format!("{scheme} {TOKEN}");
            let found = headers(&[("authorization", &value)]);
            assert_eq!(authorize(Some(&token), &found, b""), Ok(()), "{scheme}");
        }
    }

    #[test]
    fn wrong_or_missing_bearer_rejected() {
        let token = Token::new(TOKEN);
        let cases = [
            ("Bearer nope", AuthError::Invalid),
            (&*format!("Bearer {TOKEN}x"), AuthError::Invalid),
            (&*format!("Bearer {}", &TOKEN[1..]), AuthError::Invalid),
            (&*format!("Basic {TOKEN}"), AuthError::Missing),
            ("Bearer ", AuthError::Missing),
        ];
        for (value, expected) in cases {
            let found = headers(&[("authorization", value)]);
            assert_eq!(
                authorize(Some(&token), &found, b""),
                Err(expected),
                "{value}"
            );
        }
        assert_eq!(
            authorize(Some(&token), &headers(&[]), b""),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn signature_of_body_accepted() {
        let token = Token::new(TOKEN);
        let body = br#"{"pods":{}}"#;
        let signature = sign(&token, body);
        assert_eq!(signature.len(), 64);

        let found = headers(&[(SIGNATURE_HEADER, &signature)]);
        assert_eq!(authorize(Some(&token), &found, body), Ok(()));
        let upper = headers(&[(SIGNATURE_HEADER, &signature.to_uppercase())]);
        assert_eq!(authorize(Some(&token), &upper, body), Ok(()));
    }

    #[test]
    fn signature_of_other_body_or_key_rejected() {
        let token = Token::new(TOKEN);
        let signature = sign(&token, b"{}");
        let found = headers(&[(SIGNATURE_HEADER, &signature)]);
        assert_eq!(
            authorize(Some(&token), &found, b"{ }"),
            Err(AuthError::Invalid)
        );

        let other = sign(&Token::new("another token of some length"), b"{}");
        let found = headers(&[(SIGNATURE_HEADER, &other)]);
        assert_eq!(
            authorize(Some(&token), &found, b"{}"),
            Err(AuthError::Invalid)
        );

        let found = headers(&[(SIGNATURE_HEADER, "not hex")]);
        assert_eq!(
            authorize(Some(&token), &found, b"{}"),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn messages_never_contain_token() {
        for error in [AuthError::Missing, AuthError::Invalid] {
            assert!(!error.to_string().contains(TOKEN), "{error}");
        }
    }
}
