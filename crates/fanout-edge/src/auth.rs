//! Tokens → [`Principal`]. Every key has one pinned algorithm: the HS256 secret only
//! verifies HS256 tokens, a PEM key only its own algorithm, a JWKS key only the
//! algorithm it declares; a token whose `alg` has no key is refused. Tokens are never
//! logged, and no error message here contains one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fanout_protocol::{claim_matches, CloseCode, ErrorCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A bad key configuration, naming the setting.
#[derive(Debug, Error)]
pub enum AuthConfigError {
    #[error("--jwt-secret / FANOUT_JWT_SECRET: must be at least 16 bytes")]
    ShortSecret,
    #[error("--jwt-public-key / FANOUT_JWT_PUBLIC_KEY: {0}")]
    PublicKey(String),
    #[error("--jwt-jwks / FANOUT_JWT_JWKS: {0}")]
    Jwks(String),
}

/// Clock skew allowed between the token issuer and the node, for `exp` and `nbf`. A
/// session ends this long after its token's `exp` too: a token the node accepts is
/// never one it closes at once.
pub(crate) const LEEWAY_SECS: u64 = 5;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (`nbf`)")]
    NotYetValid,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token algorithm {0} has no key configured")]
    Algorithm(String),
    #[error("token key id is unknown")]
    UnknownKey,
    #[error("token lacks claim `{0}`")]
    MissingClaim(String),
    #[error("subscription token is for another user")]
    OtherUser,
    #[error("subscription token is for another channel")]
    OtherChannel,
    #[error("a subscription token cannot open a connection")]
    SubscriptionTokenAsConnection,
}

impl AuthError {
    /// The close code for a connection token refused with this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            AuthError::Expired => CloseCode::TokenExpired,
            _ => CloseCode::Unauthorized,
        }
    }

    /// The error code for an in-band refusal (subscription token, refresh).
    pub fn error_code(&self) -> ErrorCode {
        match self {
            AuthError::OtherUser | AuthError::OtherChannel => ErrorCode::Forbidden,
            _ => ErrorCode::Unauthorized,
        }
    }

    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Audience => "audience",
            AuthError::Issuer => "issuer",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::UnknownKey => "unknown_key",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::OtherUser => "other_user",
            AuthError::OtherChannel => "other_channel",
            AuthError::SubscriptionTokenAsConnection => "subscription_token",
        }
    }
}

/// An authenticated connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: Arc<str>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The `channels` claim: exact names or `prefix*`.
    pub channels: Vec<String>,
}

impl Principal {
    /// Whether the `channels` claim grants `channel`.
    pub fn has_claim(&self, channel: &str) -> bool {
        self.channels.iter().any(|p| claim_matches(p, channel))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    // Optional here so that a missing `exp` is reported as such, not as malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    channels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    channel: Option<String>,
}

struct Key {
    key: DecodingKey,
    alg: Algorithm,
}

/// The verifier.
pub struct Auth {
    secret: Option<Key>,
    public: Option<Key>,
    jwks: HashMap<String, Key>,
    audience: Option<String>,
    issuer: Option<String>,
}

impl Auth {
    pub fn from_config(
        secret: Option<&str>,
        public_key: Option<&Path>,
        jwks: Option<&Path>,
        audience: Option<String>,
        issuer: Option<String>,
    ) -> Result<Auth, AuthConfigError> {
        let secret = match secret {
            None => None,
            Some(s) if s.len() < 16 => return Err(AuthConfigError::ShortSecret),
            Some(s) => Some(Key {
                key: DecodingKey::from_secret(s.as_bytes()),
                alg: Algorithm::HS256,
            }),
        };
        let public = public_key.map(load_pem).transpose()?;
        let jwks = jwks.map(load_jwks).transpose()?.unwrap_or_default();
        Ok(Auth {
            secret,
            public,
            jwks,
            audience,
            issuer,
        })
    }

    /// Verifies a connection token.
    pub fn verify_connection(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = self.verify(token)?;
        // A token scoped to one channel must not open a connection as its user.
        if claims.channel.is_some() {
            return Err(AuthError::SubscriptionTokenAsConnection);
        }
        Ok(Principal {
            user: Arc::from(claims.sub),
            exp: claims
                .exp
                .ok_or_else(|| AuthError::MissingClaim("exp".into()))?,
            channels: claims.channels,
        })
    }

    /// Verifies a subscription token (`sub`, `channel`, `exp`) for `principal` and
    /// `channel`; returns its expiry (seconds since the Unix epoch).
    pub fn verify_subscription(
        &self,
        token: &str,
        principal: &Principal,
        channel: &str,
    ) -> Result<u64, AuthError> {
        let claims = self.verify(token)?;
        if *claims.sub != *principal.user {
            return Err(AuthError::OtherUser);
        }
        match claims.channel.as_deref() {
            Some(c) if c == channel => Ok(claims.exp.unwrap_or_default()),
            Some(_) => Err(AuthError::OtherChannel),
            None => Err(AuthError::MissingClaim("channel".into())),
        }
    }

    fn key_for(&self, header: &jsonwebtoken::Header) -> Result<&Key, AuthError> {
        let alg_name = || format!("{:?}", header.alg);
        if let Some(kid) = &header.kid {
            if !self.jwks.is_empty() {
                let key = self.jwks.get(kid).ok_or(AuthError::UnknownKey)?;
                return if key.alg == header.alg {
                    Ok(key)
                } else {
                    Err(AuthError::Algorithm(alg_name()))
                };
            }
        }
        [&self.secret, &self.public]
            .into_iter()
            .flatten()
            .find(|k| k.alg == header.alg)
            .ok_or_else(|| {
                if self.secret.is_none() && self.public.is_none() {
                    AuthError::UnknownKey
                } else {
                    AuthError::Algorithm(alg_name())
                }
            })
    }

    fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let key = self.key_for(&header)?;
        let mut validation = Validation::new(key.alg);
        // The same small leeway for `exp` and `nbf` (clock skew between issuer and node).
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // A configured audience or issuer is required, not only checked when present:
        // otherwise a token that simply leaves it out would pass.
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAudience => AuthError::Audience,
                ErrorKind::InvalidIssuer => AuthError::Issuer,
                ErrorKind::InvalidAlgorithm => AuthError::Algorithm(format!("{:?}", header.alg)),
                ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
                _ => AuthError::Malformed,
            })
            .and_then(
                |data| match (&data.claims.exp, data.claims.sub.is_empty()) {
                    (None, _) => Err(AuthError::MissingClaim("exp".into())),
                    (_, true) => Err(AuthError::MissingClaim("sub".into())),
                    _ => Ok(data.claims),
                },
            )
    }

    /// Mints an HS256 token (dev mode only): 24 hours, for `user`, with `channels`.
    pub(crate) fn dev_token(&self, user: &str, secret: &str, channels: &[&str]) -> String {
        let claims = Claims {
            sub: user.to_string(),
            exp: Some(jsonwebtoken::get_current_timestamp() + 24 * 3600),
            channels: channels.iter().map(|s| s.to_string()).collect(),
            channel: None,
        };
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.typ = Some("JWT".into());
        let mut claims_value = serde_json::to_value(&claims).expect("claims serialize");
        if let Some(aud) = &self.audience {
            claims_value["aud"] = aud.clone().into();
        }
        if let Some(iss) = &self.issuer {
            claims_value["iss"] = iss.clone().into();
        }
        jsonwebtoken::encode(
            &header,
            &claims_value,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("HS256 encoding cannot fail")
    }
}

fn load_pem(path: &Path) -> Result<Key, AuthConfigError> {
    let pem = std::fs::read(path)
        .map_err(|e| AuthConfigError::PublicKey(format!("cannot read {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&pem);
    let (key, alg) = if text.contains("BEGIN RSA PUBLIC KEY") {
        (DecodingKey::from_rsa_pem(&pem), Algorithm::RS256)
    } else if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        (Ok(k), Algorithm::RS256)
    } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        (Ok(k), Algorithm::ES256)
    } else {
        (DecodingKey::from_ed_pem(&pem), Algorithm::EdDSA)
    };
    let key = key.map_err(|e| {
        AuthConfigError::PublicKey(format!(
            "{} is not an RSA, EC (P-256) or Ed25519 public key in PEM: {e}",
            path.display()
        ))
    })?;
    Ok(Key { key, alg })
}

fn load_jwks(path: &Path) -> Result<HashMap<String, Key>, AuthConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AuthConfigError::Jwks(format!("cannot read {}: {e}", path.display())))?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| AuthConfigError::Jwks(format!("{} is not a JWKS: {e}", path.display())))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| AuthConfigError::Jwks("every key needs a `kid`".into()))?;
        let alg = match jwk.common.key_algorithm {
            Some(ka) => Algorithm::try_from(ka)
                .map_err(|_| AuthConfigError::Jwks(format!("key `{kid}`: unsupported `alg`")))?,
            None => match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P384 => {
                    Algorithm::ES384
                }
                AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                _ => {
                    return Err(AuthConfigError::Jwks(format!(
                        "key `{kid}`: unsupported key type"
                    )))
                }
            },
        };
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| AuthConfigError::Jwks(format!("key `{kid}`: {e}")))?;
        keys.insert(kid, Key { key, alg });
    }
    if keys.is_empty() {
        return Err(AuthConfigError::Jwks(format!(
            "{} has no keys",
            path.display()
        )));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn hs(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn auth(aud: Option<&str>) -> Auth {
        Auth::from_config(Some(SECRET), None, None, aud.map(Into::into), None).unwrap()
    }

    #[test]
    fn accepts_valid_and_reads_claims() {
        let t = hs(
            serde_json::json!({"sub":"42","exp":now()+60,"channels":["job_progress:*"]}),
            SECRET,
        );
        let p = auth(None).verify_connection(&t).unwrap();
        assert_eq!(&*p.user, "42");
        assert!(p.has_claim("job_progress:7"));
        assert!(!p.has_claim("chat:7"));
    }

    #[test]
    fn refusals_map_to_close_codes() {
        let a = auth(Some("fanout"));
        let bad_sig = hs(
            serde_json::json!({"sub":"1","exp":now()+60,"aud":"fanout"}),
            "another-secret-another-secret",
        );
        assert_eq!(a.verify_connection(&bad_sig), Err(AuthError::BadSignature));
        let expired = hs(
            serde_json::json!({"sub":"1","exp":now()-3600,"aud":"fanout"}),
            SECRET,
        );
        let e = a.verify_connection(&expired).unwrap_err();
        assert_eq!(
            (e.clone(), e.close_code()),
            (AuthError::Expired, CloseCode::TokenExpired)
        );
        let wrong_aud = hs(
            serde_json::json!({"sub":"1","exp":now()+60,"aud":"other"}),
            SECRET,
        );
        assert_eq!(a.verify_connection(&wrong_aud), Err(AuthError::Audience));
        let no_exp = hs(serde_json::json!({"sub":"1","aud":"fanout"}), SECRET);
        assert_eq!(
            a.verify_connection(&no_exp),
            Err(AuthError::MissingClaim("exp".into()))
        );
        let no_sub = hs(serde_json::json!({"exp":now()+60,"aud":"fanout"}), SECRET);
        assert_eq!(
            a.verify_connection(&no_sub),
            Err(AuthError::MissingClaim("sub".into()))
        );
        assert_eq!(a.verify_connection("garbage"), Err(AuthError::Malformed));
        assert_eq!(a.verify_connection(""), Err(AuthError::Missing));
    }

    #[test]
    fn configured_audience_and_issuer_are_required() {
        let a = Auth::from_config(
            Some(SECRET),
            None,
            None,
            Some("fanout".into()),
            Some("https://issuer".into()),
        )
        .unwrap();
        let p = Principal {
            user: "1".into(),
            exp: now() + 60,
            channels: vec![],
        };
        let both =
            serde_json::json!({"sub":"1","exp":now()+60,"aud":"fanout","iss":"https://issuer"});
        assert!(a.verify_connection(&hs(both.clone(), SECRET)).is_ok());
        for missing in ["aud", "iss"] {
            let mut claims = both.clone();
            claims.as_object_mut().unwrap().remove(missing);
            let e = a
                .verify_connection(&hs(claims.clone(), SECRET))
                .unwrap_err();
            assert_eq!(e, AuthError::MissingClaim(missing.into()));
            assert_eq!(e.close_code(), CloseCode::Unauthorized);
            // Subscription tokens too.
            claims["channel"] = "job_progress:7".into();
            let e = a
                .verify_subscription(&hs(claims, SECRET), &p, "job_progress:7")
                .unwrap_err();
            assert_eq!(e, AuthError::MissingClaim(missing.into()));
            assert_eq!(e.error_code(), ErrorCode::Unauthorized);
        }
        // Unconfigured: neither is needed.
        let t = hs(serde_json::json!({"sub":"1","exp":now()+60}), SECRET);
        assert!(auth(None).verify_connection(&t).is_ok());
    }

    #[test]
    fn nbf_is_honoured_with_the_exp_leeway() {
        let a = auth(None);
        let later = hs(
            serde_json::json!({"sub":"1","exp":now()+7200,"nbf":now()+3600}),
            SECRET,
        );
        let e = a.verify_connection(&later).unwrap_err();
        assert_eq!(e, AuthError::NotYetValid);
        assert_eq!(e.close_code(), CloseCode::Unauthorized);
        // Within the leeway (clock skew): accepted.
        let skewed = hs(
            serde_json::json!({"sub":"1","exp":now()+60,"nbf":now()+2}),
            SECRET,
        );
        assert!(a.verify_connection(&skewed).is_ok());
        let past = hs(
            serde_json::json!({"sub":"1","exp":now()+60,"nbf":now()-60}),
            SECRET,
        );
        assert!(a.verify_connection(&past).is_ok());
    }

    #[test]
    fn algorithm_is_pinned_per_key() {
        // An HS384 token against an HS256-only secret.
        let t = encode(
            &Header::new(Algorithm::HS384),
            &serde_json::json!({"sub":"1","exp":now()+60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let e = auth(None).verify_connection(&t).unwrap_err();
        assert_eq!(e, AuthError::Algorithm("HS384".into()));
        assert_eq!(e.close_code(), CloseCode::Unauthorized);
    }

    #[test]
    fn subscription_tokens_bind_user_and_channel() {
        let a = auth(None);
        let p = Principal {
            user: "42".into(),
            exp: now() + 60,
            channels: vec![],
        };
        let t = hs(
            serde_json::json!({"sub":"42","exp":now()+60,"channel":"job_progress:7"}),
            SECRET,
        );
        assert!(a.verify_subscription(&t, &p, "job_progress:7").unwrap() > now());
        assert_eq!(
            a.verify_subscription(&t, &p, "job_progress:8"),
            Err(AuthError::OtherChannel)
        );
        let other = hs(
            serde_json::json!({"sub":"43","exp":now()+60,"channel":"job_progress:7"}),
            SECRET,
        );
        assert_eq!(
            a.verify_subscription(&other, &p, "job_progress:7"),
            Err(AuthError::OtherUser)
        );
        assert_eq!(
            a.verify_connection(&t),
            Err(AuthError::SubscriptionTokenAsConnection)
        );
    }
}
