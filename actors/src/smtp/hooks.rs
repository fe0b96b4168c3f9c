//! Where the SMTP connection asks the embedder's [`Policy`](crate::policy::Policy)
//! at connect, HELO/EHLO, MAIL and end of DATA (RCPT is asked inside the
//! routing step, [`policy::rcpt`]). `smtp.rs` calls these only when a policy
//! is registered; each waits for the answer as the routing step does, then
//! resumes the session.

use actix::prelude::*;
use postino_core::logsafe::escape;
use postino_core::smtp::session::{Accepted, RouteQuery};
use postino_core::smtp::Reply;
use postino_core::Address;
use tracing::info;

use super::{SmtpConnection, COMMANDS};
use crate::policy::{self, Client};

impl SmtpConnection {
    /// The client as the policies see it now.
    pub(super) fn client(&self) -> Client {
        Client {
            peer: self.peer,
            tls: self.session.is_tls(),
            helo: self.session.helo().map(str::to_owned),
            authenticated: self.session.authenticated_user().map(str::to_owned),
        }
    }

    /// The connect stage: `greeting` is sent if the policies let the client
    /// in; otherwise their reply is, and the connection is closed.
    pub(super) fn screen_connect(&mut self, greeting: Reply, ctx: &mut Context<Self>) {
        let Some(policies) = self.shared.policy.clone() else {
            self.queue(&greeting);
            return self.drive(ctx);
        };
        let client = self.client();
        let fut = async move { policies.connect(&client).await };
        ctx.wait(fut.into_actor(self).map(move |answer, act, ctx| match answer {
            Ok(()) => {
                act.queue(&greeting);
                act.drive(ctx);
            }
            Err(reply) => {
                // As Postfix logs a refusal at connect.
                info!(
                    parent: &act.span,
                    "NOQUEUE: reject: CONNECT from [{ip}]: {code}{status} {text}; proto=SMTP",
                    ip = act.peer.ip(),
                    code = reply.code,
                    status = reply.status.as_deref().map(|s| format!(" {s}")).unwrap_or_default(),
                    text = escape(reply.text.as_ref()),
                );
                act.close_with(reply, ctx);
            }
        }));
    }

    /// The hello stage, while the session holds the HELO/EHLO unanswered
    /// ([`Session::pending_hello`]): if the policies agree the session
    /// carries it out; a refused greeting leaves the session as it was
    /// ([`Session::refuse`]).
    ///
    /// [`Session::pending_hello`]: postino_core::smtp::Session::pending_hello
    /// [`Session::refuse`]: postino_core::smtp::Session::refuse
    pub(super) fn screen_hello(&mut self, name: String, ctx: &mut Context<Self>) {
        let Some(policies) = self.shared.policy.clone() else {
            return self.drive(ctx);
        };
        let client = self.client();
        let fut = async move { policies.hello(&client, &name).await };
        ctx.wait(fut.into_actor(self).map(move |answer, act, ctx| {
            let go_on = match answer {
                Ok(()) => true,
                Err(reply) => {
                    let step = act.session.refuse(reply);
                    act.step(step, ctx)
                }
            };
            if go_on {
                act.drive(ctx);
            }
        }));
    }

    /// Whether `reply` is the server's acceptance of a MAIL command (for
    /// the mail stage).
    pub(super) fn screens_mail(&self, reply: &Reply) -> bool {
        reply.is_positive()
            && self
                .current
                .as_ref()
                .is_some_and(|c| COMMANDS[c.command] == "mail")
    }

    /// The mail stage, once the session accepted MAIL: `accept` is sent if
    /// the policies agree; otherwise the transaction ends with their reply.
    pub(super) fn screen_mail(&mut self, accept: Reply, ctx: &mut Context<Self>) {
        let Some(policies) = self.shared.policy.clone() else {
            self.queue(&accept);
            return self.drive(ctx);
        };
        let client = self.client();
        let from = self
            .session
            .sender()
            .filter(|s| !s.is_empty())
            .and_then(|s| Address::parse(&s, true).ok());
        let fut = async move { policies.mail(&client, from.as_ref()).await };
        ctx.wait(fut.into_actor(self).map(move |answer, act, ctx| {
            let go_on = match answer {
                Ok(()) => {
                    act.queue(&accept);
                    true
                }
                Err(reply) => {
                    let step = act.session.refuse(reply);
                    act.step(step, ctx)
                }
            };
            if go_on {
                act.drive(ctx);
            }
        }));
    }

    /// The end-of-DATA stage, before the message is stored: it goes on to
    /// [`SmtpConnection::submit`] as the policies changed it, or is refused
    /// with their reply (the transaction ends, nothing is stored).
    pub(super) fn screen_data(&mut self, accepted: Accepted, ctx: &mut Context<Self>) {
        let Some(policies) = self.shared.policy.clone() else {
            return self.submit(accepted, ctx);
        };
        let client = self.client();
        // A rerouted recipient is routed as a RCPT of this transaction.
        let sender = (accepted.sender.as_deref()).and_then(|s| Address::parse(s, true).ok());
        let (may_relay, ip) = (self.session.relay_allowed(), self.peer.ip());
        let authenticated = client.authenticated.clone();
        let query = move |recipient| RouteQuery {
            recipient,
            sender: sender.clone(),
            may_relay,
            client: ip,
            authenticated: authenticated.clone(),
        };
        let router = self.shared.router.clone();
        let fut = policy::data(policies, client, accepted, query, router);
        ctx.wait(
            fut.into_actor(self)
                .map(move |answer, act, ctx| match answer {
                    Ok(accepted) => act.submit(accepted, ctx),
                    Err(reply) => {
                        let step = act.session.refuse(reply);
                        if act.step(step, ctx) {
                            act.drive(ctx);
                        }
                    }
                }),
        );
    }
}
