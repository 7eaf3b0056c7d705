//! Who may call what: the publish and operate permissions, from the peer's credentials on
//! the Unix socket or the token over TCP (compared in constant time).

#[allow(clippy::wildcard_imports)]
use super::*;

/// Reads the bearer token of a TCP listener from `path` (the file of `key`).
///
/// # Errors
/// [`ServeError::Token`], [`ServeError::EmptyToken`] or [`ServeError::InvalidToken`].
pub fn read_token(key: &'static str, path: &Path) -> Result<String, ServeError> {
    let token = std::fs::read_to_string(path)
        .map_err(|source| ServeError::Token {
            key,
            path: path.to_owned(),
            source,
        })?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(ServeError::EmptyToken {
            key,
            path: path.to_owned(),
        });
    }
    if format!("Bearer {token}")
        .parse::<MetadataValue<tonic::metadata::Ascii>>()
        .is_err()
    {
        return Err(ServeError::InvalidToken {
            key,
            path: path.to_owned(),
        });
    }
    Ok(token)
}

/// The tokens of a TCP listener: `authorization: Bearer <token>` as sent.
#[derive(Clone)]
pub struct Tokens {
    publish: Vec<u8>,
    operate: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("operate", &self.operate.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// The publish token and, if any, the operator token.
    ///
    /// # Errors
    /// [`ServeError::SameTokens`] when they are equal.
    pub fn new(publish: &str, operate: Option<&str>) -> Result<Self, ServeError> {
        if operate == Some(publish) {
            return Err(ServeError::SameTokens);
        }
        let header = |token: &str| format!("Bearer {token}").into_bytes();
        Ok(Self {
            publish: header(publish),
            operate: operate.map(header),
        })
    }

    /// What the `authorization` header `given` grants. Compared in constant time: how long
    /// the comparison takes says nothing about how much of a guess was right.
    fn grant(&self, given: Option<&[u8]>) -> Result<Permission, Status> {
        let Some(given) = given else {
            return Err(Status::unauthenticated(
                "this TCP endpoint needs `authorization: Bearer <token>` (tcp_token_file, or \
                 tcp_operator_token_file to operate)",
            ));
        };
        let operate = self
            .operate
            .as_ref()
            .is_some_and(|token| bool::from(token.as_slice().ct_eq(given)));
        let publish = bool::from(self.publish.as_slice().ct_eq(given));
        if operate {
            Ok(Permission::Operate)
        } else if publish {
            Ok(Permission::Publish)
        } else {
            Err(Status::unauthenticated("wrong token"))
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    /// `Publisher`, health checking, reflection.
    Publish,
    /// `Control` (and everything `Publish` allows).
    Operate,
}

/// Who called, as the connection knows it: put in every request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A Unix socket peer and its credentials (`SO_PEERCRED`), when known.
    Unix(Option<(u32, u32)>),
    /// A TCP peer.
    Tcp(SocketAddr),
}

impl Peer {
    /// The peer's identity for shares of a limit: its uid, or its IP address.
    pub fn identity(&self) -> String {
        match self {
            Self::Unix(Some((uid, _))) => format!("uid {uid}"),
            Self::Unix(None) => "an unknown Unix peer".to_owned(),
            Self::Tcp(address) => format!("{}", address.ip()),
        }
    }
}

/// A set of users and groups, resolved.
#[derive(Debug, Clone, Default)]
pub(super) struct Members {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Members {
    fn new(users: &[String], groups: &[&str]) -> Self {
        let mut uids: Vec<u32> = vec![0, rustix::process::geteuid().as_raw()];
        uids.extend(users.iter().filter_map(|u| loader::uid_of(u)));
        let mut gids = Vec::new();
        for (gid, members) in groups.iter().filter_map(|g| loader::group_of(g)) {
            gids.push(gid);
            uids.extend(members.iter().filter_map(|m| loader::uid_of(m)));
        }
        Self { uids, gids }
    }

    /// Whether `(uid, gid)` is one of them (the gid is the peer's primary group).
    fn contains(&self, (uid, gid): (u32, u32)) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// Who may call over the Unix socket, beyond what the socket file's mode and group allow.
/// Publish: with `allowed_users` or `socket_group` set, root, the daemon's own user, one of
/// `allowed_users`, or a member of `socket_group` (its primary group, or a listed member);
/// else whoever can open the socket. Operate: root, the daemon's own user, one of
/// `operator_users`, or a member of one of `operator_groups`.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `None`: whoever can open the socket.
    publishers: Option<Members>,
    operators: Members,
}

impl Access {
    /// From the configuration (names resolved now).
    pub fn new(host: &HostSettings) -> Self {
        let publishers =
            (!host.allowed_users.is_empty() || host.socket_group.is_some()).then(|| {
                Members::new(
                    &host.allowed_users,
                    &host.socket_group.as_deref().into_iter().collect::<Vec<_>>(),
                )
            });
        let groups: Vec<&str> = host.operator_groups.iter().map(String::as_str).collect();
        Self {
            publishers,
            operators: Members::new(&host.operator_users, &groups),
        }
    }

    /// Refuses a peer that lacks `needed` (PERMISSION_DENIED naming its uid, the permission
    /// and how to grant it).
    fn check(&self, peer: Option<&Peer>, needed: Permission) -> Result<(), Status> {
        let credentials = match peer {
            Some(Peer::Unix(Some(credentials))) => *credentials,
            _ if self.publishers.is_none() && needed == Permission::Publish => return Ok(()),
            _ => {
                return Err(Status::permission_denied(
                    "the peer's credentials are unknown; refused",
                ));
            }
        };
        let uid = credentials.0;
        let publisher = self
            .publishers
            .as_ref()
            .is_none_or(|p| p.contains(credentials));
        let operator = self.operators.contains(credentials);
        match needed {
            _ if !publisher && !operator => Err(Status::permission_denied(format!(
                "uid {uid} may not use this socket (allowed_users, socket_group; \
                 operator_users, operator_groups)"
            ))),
            Permission::Operate if !operator => Err(Status::permission_denied(format!(
                "uid {uid} lacks the operate permission that plugind.v1.Control needs (it \
                 may publish only): add the user to [host] operator_users, or to a group \
                 of operator_groups, and restart the daemon"
            ))),
            _ => Ok(()),
        }
    }
}

/// The permission check of one listener.
#[derive(Debug, Clone)]
pub(super) enum Check {
    Unix(Arc<Access>),
    Tcp(Arc<Tokens>),
}

impl Check {
    #[allow(clippy::result_large_err)]
    pub(super) fn check(
        &self,
        request: Request<()>,
        needed: Permission,
    ) -> Result<Request<()>, Status> {
        match self {
            Self::Unix(access) => access
                .check(request.extensions().get::<Peer>(), needed)
                .map(|()| request),
            Self::Tcp(tokens) => {
                let given = request
                    .metadata()
                    .get("authorization")
                    .map(MetadataValue::as_bytes);
                match tokens.grant(given)? {
                    granted if granted >= needed => Ok(request),
                    _ if tokens.operate.is_none() => Err(Status::permission_denied(
                        "plugind.v1.Control needs the operate permission, and this daemon has \
                         no operator token: set [host] tcp_operator_token_file and restart it \
                         (the token of tcp_token_file allows publishing only)",
                    )),
                    _ => Err(Status::permission_denied(
                        "plugind.v1.Control needs the operate permission: the token given is \
                         the publish token (tcp_token_file); send the operator token \
                         (tcp_operator_token_file)",
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_grants_its_permission_and_nothing_else() {
        let tokens = Tokens::new("pub", Some("ops")).unwrap();
        assert_eq!(
            tokens.grant(Some(b"Bearer pub")).unwrap(),
            Permission::Publish
        );
        assert_eq!(
            tokens.grant(Some(b"Bearer ops")).unwrap(),
            Permission::Operate
        );
        for wrong in [&b"Bearer pu"[..], b"Bearer pubx", b"", b"pub"] {
            assert_eq!(
                tokens.grant(Some(wrong)).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
        assert!(Tokens::new("same", Some("same")).is_err());
    }
}
