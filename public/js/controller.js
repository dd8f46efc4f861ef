/*
 * The controller: the bridge between the socket client (app bus) and the
 * views (view bus). It owns the session: who we are, whether a login is
 * pending, and logging in again under the same name after a reconnect
 * (by resuming with the server's token when it offers one, else by a plain
 * `login`).
 */
(function (ChatApp, Backbone, _) {
  'use strict';

  var models = ChatApp.models;
  var views = ChatApp.views;

  var RESUME_ANSWER_MS = 5000;   // wait this long for welcome/resumeFailed before a plain login
  var RELOGIN_RETRY_MS = 2000;   // our old connection may still hold the name
  var RELOGIN_TRIES = 40;        // ~80 s: longer than the server's default ping timeout
  var HISTORY_PAGE = 50;
  var AUTO_LOGIN_TRIES = 5;      // after a reload our old page's socket may hold the name a moment
  var AUTO_LOGIN_RETRY_MS = 1000;

  // The name this tab is logged in under, so that reloading the page logs
  // in again under it. sessionStorage: this tab only, gone when it closes.
  // Only the name: a reload is a fresh login (with fresh history).
  var SAVED_NAME_KEY = 'chat.name';
  var savedName = {
    get: function () {
      try { return window.sessionStorage.getItem(SAVED_NAME_KEY); } catch (e) { return null; }
    },
    set: function (name) {
      try { window.sessionStorage.setItem(SAVED_NAME_KEY, name); } catch (e) { /* storage disabled */ }
    },
    clear: function () {
      try { window.sessionStorage.removeItem(SAVED_NAME_KEY); } catch (e) { /* storage disabled */ }
    }
  };

  // Accounts mode (issue 13). Ask for a new access token when this share of
  // its lifetime is left (15 min tokens: about 4 min before expiry), and again
  // after a failed try: a refresh needs a token that is still valid.
  var REFRESH_LEFT = 0.25;
  var REFRESH_RETRY_MS = 5000;
  // A refreshed token with at least this much life left is worth a reconnect
  // when the connection's older token runs out (its `exp` is whole seconds).
  var FRESH_ENOUGH_MS = 1500;

  // Why the sign-in form is shown again, by the server's code (connect_error
  // data or protocolError).
  var SESSION_ENDS = {
    auth_required: 'Sign in to chat.',
    invalid_token: 'Your session is no longer valid: sign in again.',
    expired_token: 'Your session has expired: sign in again.',
    token_expired: 'Your session has expired: sign in again.',
    token_revoked: 'You were signed out: sign in again.',
    kicked: 'You were removed from the chat by a moderator.',
    banned: 'This account is banned from the chat.'
  };

  var READ_DELAY_MS = 300;       // markRead once a conversation has been shown this long without a change

  var CHAT_ERRORS = {
    empty_message: 'Empty messages are not sent.',
    rate_limited: 'Too many messages: slow down.',
    not_logged_in: 'Not logged in yet: try again in a moment.',
    not_stored: 'The server could not store the message: try again.',
    not_a_member: 'You are not in this room any more.',
    no_such_room: 'This room does not exist.',
    no_such_user: 'There is no user of that name.',
    bad_attachment: 'A file could not be sent (sent already, or its upload expired): attach it again.',
    too_many_attachments: 'Too many files in one message: remove some.'
  };

  var ROOM_ERRORS = {
    room_name_bad: 'Invalid room name: 2 to 20 visible characters, single spaces.',
    room_exists: 'A room with that name exists already.',
    no_such_room: 'There is no room of that name.',
    room_full: 'This room is full.',
    too_many_rooms: 'Too many rooms: leave one first.',
    cannot_leave_lobby: 'Everyone stays in the lobby.'
  };

  function errorText(table, error) {
    return table[error.code] || error.message || error.code;
  }

  var MainController = function (options) {
    var self = this;
    options = options || {};

    self.appEventBus = _.extend({}, Backbone.Events);  // socket client -> controller
    self.viewEventBus = _.extend({}, Backbone.Events); // views -> controller

    self.me = null;           // the name we are logged in under (kept across reconnects)
    self.pendingLogin = null; // a name typed on the login screen, not answered yet
    self.resumeToken = null;
    self.homeModel = null;
    self.lostNotice = null;   // the "Connection lost." line, dropped again if the server resumes us
    self.autoLoginTries = 0;  // > 0 while logging in again under the saved name after a reload
    self.timers = {};
    self.tokenWanted = false; // something needed an upload token since the login: keep one
    self.tokenPending = false;
    self.tokenTicket = 0;     // bumped when the connection drops: a late answer is not for this session
    self.tokenWaiters = [];
    self.mode = null;         // 'open' or 'accounts', once the server said
    self.session = null;      // accounts mode: {token, name, expiresAt} while signed in
    self.reconnectWhenStopped = false; // the server ended an expired token's connection; we hold a fresh one

    self.init = function () {
      self.connection = new models.ConnectionModel();
      self.statusView = new views.StatusView({
        el: options.statusEl || '#status', model: self.connection, vent: self.viewEventBus
      }).render();

      self.loginModel = new models.LoginModel();
      var saved = savedName.get();
      if (saved) {
        self.loginModel.set('name', saved); // shown in the field while it logs in
      }
      self.containerModel = new models.ContainerModel();
      self.containerView = new views.ContainerView({ el: options.containerEl || '#container', model: self.containerModel });

      self.chatClient = new ChatApp.ChatClient({
        vent: self.appEventBus,
        url: options.url,
        resumeState: function () {
          if (!self.me || !self.resumeToken || !self.homeModel) {
            return null;
          }
          return { resumeToken: self.resumeToken, lastPosition: self.homeModel.horizon };
        },
        token: function () {
          return self.session ? self.session.token : null;
        }
      });

      // The same page serves both modes: the server says which form to show.
      ChatApp.auth.mode(function (mode) {
        self.mode = mode;
        if (mode === 'accounts') {
          self.startAccounts();
        } else {
          self.startOpen(saved);
        }
      });
    };

    // Open mode: type a name and chat, as the tutorial does.
    self.startOpen = function (saved) {
      self.showLogin('');
      self.chatClient.connect();
      if (saved) {
        self.autoLoginTries = 1;
        self.viewEventBus.trigger('login', saved);
      }
    };

    // Accounts mode: connect only with a token (the server refuses a
    // handshake without one), from this tab's storage or a sign-in.
    self.startAccounts = function () {
      savedName.clear(); // open mode's; the account's name comes with its token
      self.accountModel = new models.AccountModel();
      self.connection.set('accounts', true);
      var stored = ChatApp.auth.store.get();
      if (stored) {
        self.accountModel.set('name', stored.name);
        self.autoLoginTries = 1; // reloaded: our old page's socket may hold the name a moment
        self.beginSession(stored);
      } else {
        self.showAccount('', '');
      }
    };

    self.showAccount = function (notice, error) {
      self.accountModel.set({ notice: notice || '', error: error || '', busy: false });
      self.connection.set({ state: 'signedOut', name: '', attempt: 0 });
      if (!(self.containerModel.get('viewState') instanceof views.AccountView)) {
        self.containerModel.set('viewState', new views.AccountView({ vent: self.viewEventBus, model: self.accountModel }));
      }
    };

    // Signed in: connect with the token and log in as the account.
    self.beginSession = function (session) {
      self.session = session;
      ChatApp.auth.store.set(session);
      self.scheduleRefresh();
      self.accountModel.submitted(session.name);
      if (!(self.containerModel.get('viewState') instanceof views.AccountView)) {
        self.containerModel.set('viewState', new views.AccountView({ vent: self.viewEventBus, model: self.accountModel }));
      }
      self.pendingLogin = session.name;
      self.connection.set({ state: 'connecting', name: '' });
      if (self.chatClient.socket) {
        self.chatClient.reconnect();
      } else {
        self.chatClient.connect();
      }
    };

    // The session is over (signed out, expired, kicked, banned, refused):
    // close the connection, forget the token, back to the form with `notice`.
    self.endSession = function (notice) {
      self.cancel('refresh');
      self.cancel('resume');
      self.cancel('relogin');
      self.cancel('autologin');
      self.session = null;
      ChatApp.auth.store.clear();
      self.reconnectWhenStopped = false;
      self.dropToken();
      self.me = null;
      self.pendingLogin = null;
      self.autoLoginTries = 0;
      self.resumeToken = null;
      self.homeModel = null;
      self.lostNotice = null;
      self.chatClient.disconnect();
      self.showAccount(notice, '');
    };

    // Ask for a new access token before this one expires; the connection
    // picks it up when it next connects (see token_expired below).
    self.scheduleRefresh = function (delay) {
      var session = self.session;
      if (delay === undefined) {
        delay = Math.max(1000, (session.expiresAt - Date.now()) * (1 - REFRESH_LEFT));
      }
      self.later('refresh', delay, function () {
        if (session !== self.session) {
          return;
        }
        ChatApp.auth.refresh(session, function (error, fresh) {
          if (session !== self.session) {
            return; // signed out meanwhile
          }
          if (!error) {
            self.session = fresh;
            ChatApp.auth.store.set(fresh);
            self.scheduleRefresh();
            self.handOver(fresh);
          } else if (error.status === 401) {
            self.endSession(SESSION_ENDS.invalid_token); // revoked, or expired already
          } else if (session.expiresAt - Date.now() > REFRESH_RETRY_MS) {
            self.scheduleRefresh(REFRESH_RETRY_MS); // server unreachable for now
          }
        });
      });
    };

    // Give the live connection the refreshed token (`reauth`), else the
    // server ends it when the token it connected with runs out. If that is
    // refused or not answered, the page reconnects with the new token then
    // (see token_expired below): the session resumes, but its user is seen
    // leaving and joining again.
    self.handOver = function (fresh) {
      if (!self.me || !self.chatClient.connected()) {
        return; // the next connection's handshake carries it
      }
      self.chatClient.reauth(fresh.token, function (error) {
        if (error && window.console) {
          window.console.warn('the server did not take the refreshed token', error.code, error.message);
        }
      });
    };

    // A login (or re-login) refused for good: in accounts mode the session
    // cannot go on, in open mode the name field shows why.
    self.loginRefused = function (error) {
      if (self.mode === 'accounts') {
        self.endSession(error);
      } else {
        self.loginModel.refused(error);
      }
    };

    self.showLogin = function (error) {
      self.loginModel.set({ error: error, busy: false });
      self.containerModel.set('viewState', new views.LoginView({ vent: self.viewEventBus, model: self.loginModel }));
    };

    self.showHome = function () {
      self.dropToken(); // the previous login's, if any
      var home = self.homeModel = new models.HomeModel(null, { base: options.url });
      self.tokenWanted = false;
      home.files.on('wanted', function () {
        if (home === self.homeModel) {
          self.fetchToken();
        }
      });
      // The conversation shown got new lines (or was just shown): mark it read.
      home.on('arrived', function (conversation) { self.scheduleRead(home, conversation); });
      self.homeView = new views.HomeView({ vent: self.viewEventBus, model: home });
      self.containerModel.set('viewState', self.homeView);
    };

    // -- conversations -----------------------------------------------------

    // Show `conversation` and fetch what it lacks: its latest history page
    // and, for a room, its members.
    self.showConversation = function (conversation) {
      var home = self.homeModel;
      if (!home || !conversation) {
        return;
      }
      home.select(conversation);
      self.loadConversation(home, conversation);
    };

    self.loadConversation = function (home, conversation) {
      if (conversation.isLobby() || !self.chatClient.connected() || !home.get('online')) {
        return; // the lobby's history comes after welcome; the rest after reconnecting
      }
      if (!conversation.loaded && !conversation.loading) {
        conversation.loading = true;
        var generation = conversation.generation;
        var query = _.extend({ limit: HISTORY_PAGE }, conversation.scope());
        self.chatClient.history(query, function (error, page) {
          if (generation !== conversation.generation) {
            return; // forgotten meanwhile (a re-login); asked again since
          }
          conversation.loading = false;
          if (error) {
            home.set('chatError', 'Could not load the messages: ' + error.message);
          } else {
            conversation.mergePage(page, true);
            self.scheduleRead(home, conversation);
          }
        });
      }
      if (conversation.get('kind') === 'room' && !conversation.membersLoaded && !conversation.loadingMembers) {
        conversation.loadingMembers = true;
        var asked = conversation.generation;
        self.chatClient.roomMembers(conversation.get('name'), function (error, answer) {
          if (asked !== conversation.generation) {
            return; // forgotten meanwhile
          }
          conversation.loadingMembers = false;
          if (!error && _.isArray(answer.members)) {
            conversation.setMembers(answer.members);
          }
        });
      }
    };

    // Mark the shown conversation read up to its newest line, once it has
    // been shown for a moment (a burst of lines costs one request).
    self.scheduleRead = function (home, conversation) {
      self.later('read:' + conversation.id, READ_DELAY_MS, function () {
        var shown = home === self.homeModel && !home.get('directory') && home.get('active') === conversation.id;
        var position = conversation.latestPosition();
        var before = conversation.get('readSent');
        if (!shown || !home.get('online') || !self.chatClient.connected() || position <= before) {
          return;
        }
        conversation.set('readSent', position);
        self.chatClient.markRead(conversation.scope(), position, function (error) {
          if (error && conversation.get('readSent') === position) {
            conversation.set('readSent', before); // try again with the next line
          }
        });
      });
    };

    self.later = function (key, ms, fn) {
      self.cancel(key);
      self.timers[key] = setTimeout(function () { delete self.timers[key]; fn(); }, ms);
    };

    self.cancel = function (key) {
      if (self.timers[key]) {
        clearTimeout(self.timers[key]);
        delete self.timers[key];
      }
    };

    // -- files -------------------------------------------------------------

    // Ask for the session's upload token (once at a time); cb(error, token).
    // While it is in use it is asked for again before it expires.
    self.fetchToken = function (cb) {
      var home = self.homeModel;
      self.tokenWanted = true;
      if (cb) {
        self.tokenWaiters.push(cb);
      }
      if (self.tokenPending) {
        return;
      }
      if (!home || !home.get('online') || !self.chatClient.connected()) {
        self.flushToken({ code: 'offline', message: 'Not connected.' }); // asked again after the next welcome
        return;
      }
      self.tokenPending = true;
      var ticket = self.tokenTicket;
      self.chatClient.uploadToken(function (error, answer) {
        if (ticket !== self.tokenTicket) {
          return; // asked on a connection that has dropped since
        }
        self.tokenPending = false;
        var flush = self.flushToken;
        if (home !== self.homeModel) {
          flush(error || { code: 'logged_out', message: 'Logged out.' });
          return;
        }
        if (!error) {
          var ttl = typeof answer.expiresIn === 'number' && answer.expiresIn > 0 ? answer.expiresIn : 60;
          home.files.grant(answer.token, ttl);
          self.later('token', Math.max(5, ttl * 0.8) * 1000, function () {
            if (home === self.homeModel) {
              self.fetchToken();
            }
          });
        }
        flush(error, error ? null : answer.token);
      });
    };

    self.flushToken = function (error, token) {
      var waiters = self.tokenWaiters;
      self.tokenWaiters = [];
      _.each(waiters, function (waiter) { waiter(error, token); });
    };

    // The connection dropped: a token asked for on it will not come.
    self.dropToken = function () {
      self.cancel('token');
      self.tokenTicket += 1;
      self.tokenPending = false;
      if (self.homeModel) {
        self.homeModel.files.expire(); // bound to the session that just ended
      }
      self.flushToken({ code: 'offline', message: 'Not connected.' });
    };

    // Upload `file` for `upload` (a PendingUpload); a token refused as
    // expired is asked for again once.
    self.upload = function (home, upload, file, mayRetry) {
      var withToken = function (cb) {
        if (home.files.valid()) {
          cb(null, home.files.get('token'));
        } else {
          self.fetchToken(cb);
        }
      };
      withToken(function (error, token) {
        if (!upload.collection || upload.get('state') !== 'uploading') {
          return; // removed meanwhile
        }
        if (error) {
          upload.failed('Could not upload: ' + error.message);
          return;
        }
        var request = ChatApp.uploadFile({
          url: home.files.uploadUrl(),
          token: token,
          file: file,
          progress: function (loaded, total) {
            // `total` is the multipart body: a little more than the file.
            upload.set('loaded', total > 0 ? Math.round(upload.get('size') * loaded / total) : 0);
          },
          done: function (error, answer) {
            upload.abort = null;
            if (error && error.status === 401 && mayRetry && home === self.homeModel) {
              home.files.expire();
              self.upload(home, upload, file, false);
            } else if (error) {
              upload.failed(error.message);
            } else {
              upload.ready(answer);
            }
          }
        });
        upload.abort = request.abort;
      });
    };

    // Log in again under our name after a reconnect.
    self.relogin = function () {
      self.reloginTries = (self.reloginTries || 0) + 1;
      self.chatClient.login(self.me);
    };

    // The re-login was refused: try again shortly, for a while, then give up
    // and show the login screen with `error`.
    self.retryRelogin = function (error) {
      if (self.reloginTries >= RELOGIN_TRIES) {
        self.loggedOut(error);
        return;
      }
      self.later('relogin', RELOGIN_RETRY_MS, function () {
        if (self.chatClient.connected()) {
          self.relogin();
        }
      });
    };

    // -- view bus ----------------------------------------------------------

    self.viewEventBus.on('login', function (name) {
      self.loginModel.submitted(name);
      self.pendingLogin = name;
      if (self.chatClient.connected()) {
        self.chatClient.login(name);
      } // else: sent on `connected`
    });

    // `conversation`: where it was typed (default: the lobby); `uploads`:
    // the ready PendingUploads sent with it, taken out of its input.
    self.viewEventBus.on('chat', function (text, conversation, uploads) {
      var home = self.homeModel;
      var place = conversation || (home && home.lobby);
      uploads = uploads || [];
      if (place && uploads.length) {
        place.uploads.remove(uploads);
      }
      var ids = _.map(uploads, function (u) { return u.get('upload').id; });
      self.chatClient.chat(text, function (error) {
        var giveBack = error && error.code !== 'timeout' && error.code !== 'bad_attachment';
        if (!giveBack || !home || home !== self.homeModel) {
          _.invoke(uploads, 'dispose');
        }
        if (!error || !home || home !== self.homeModel) {
          return;
        }
        home.set('chatError', errorText(CHAT_ERRORS, error));
        if (error.code !== 'timeout') {
          home.trigger('unsent', text, conversation); // refused, so certainly not sent: give it back
        }
        if (giveBack && place) {
          place.uploads.add(uploads);
        }
      }, conversation ? conversation.target() : null, ids);
    });

    self.viewEventBus.on('attach', function (files, conversation) {
      var home = self.homeModel;
      var place = conversation || (home && home.lobby);
      if (!home || !place) {
        return;
      }
      _.each(files, function (file) {
        var upload = new models.PendingUpload({ name: file.name || 'file', size: file.size || 0, type: file.type || '' });
        if (_.contains(models.INLINE_IMAGES, file.type) && window.URL.createObjectURL) {
          upload.preview = window.URL.createObjectURL(file); // this page's own copy, shown while it uploads
        }
        place.uploads.add(upload);
        self.upload(home, upload, file, true);
      });
    });

    self.viewEventBus.on('loadOlder', function (conversation) {
      var home = self.homeModel;
      conversation = conversation || (home && home.lobby);
      var before = conversation && conversation.chats.firstPosition();
      if (!home || before === undefined) {
        return;
      }
      conversation.set('loadingOlder', true);
      var query = _.extend({ before: before, limit: HISTORY_PAGE }, conversation.isLobby() ? {} : conversation.scope());
      self.chatClient.history(query, function (error, page) {
        if (error) {
          conversation.set('loadingOlder', false);
          home.set('chatError', 'Could not load earlier messages: ' + error.message);
        } else if (conversation.isLobby()) {
          home.prependOlder(page);
        } else {
          conversation.mergePage(page, false);
        }
      });
    });

    self.viewEventBus.on('select', function (key) {
      var home = self.homeModel;
      self.showConversation(home && home.conversations.get(key));
    });

    self.viewEventBus.on('openPrivate', function (name) {
      var home = self.homeModel;
      if (home && typeof name === 'string' && name && name !== self.me) {
        self.showConversation(home.ensurePrivate(name));
      }
    });

    self.viewEventBus.on('browseRooms', function () {
      var home = self.homeModel;
      if (!home) {
        return;
      }
      home.set('directory', true);
      home.directory.set({ loading: true, error: '' });
      self.chatClient.listRooms(null, function (error, answer) {
        if (error) {
          home.directory.set({ loading: false, error: 'Could not list the rooms: ' + error.message });
        } else {
          home.directory.addPage(answer, true);
        }
      });
    });

    self.viewEventBus.on('moreRooms', function () {
      var home = self.homeModel;
      if (!home || home.directory.get('loading')) {
        return;
      }
      home.directory.set({ loading: true, error: '' });
      self.chatClient.listRooms(home.directory.lastRoom(), function (error, answer) {
        if (error) {
          home.directory.set({ loading: false, error: 'Could not list the rooms: ' + error.message });
        } else {
          home.directory.addPage(answer, false);
        }
      });
    });

    self.viewEventBus.on('closeDirectory', function () {
      if (self.homeModel) {
        self.showConversation(self.homeModel.activeConversation());
      }
    });

    self.viewEventBus.on('createRoom', function (name, topic) {
      var home = self.homeModel;
      if (!home) {
        return;
      }
      home.directory.set({ creating: true, createError: '' });
      self.chatClient.createRoom(name, topic, function (error, answer) {
        home.directory.set('creating', false);
        if (error) {
          home.directory.set('createError', errorText(ROOM_ERRORS, error));
          return;
        }
        var room = home.ensureRoom(typeof answer.room === 'string' ? answer.room : name, {
          topic: typeof answer.topic === 'string' ? answer.topic : topic
        });
        room.set('joinedPosition', Math.max(room.get('joinedPosition'), models.toPosition(answer.position) || 0));
        if (home === self.homeModel) {
          self.showConversation(room);
        }
      });
    });

    self.viewEventBus.on('joinRoom', function (name) {
      var home = self.homeModel;
      if (!home) {
        return;
      }
      var listed = home.directory.rooms.get(name.toLowerCase());
      self.chatClient.joinRoom(name, function (error, answer) {
        if (error) {
          home.directory.set('error', errorText(ROOM_ERRORS, error));
          return;
        }
        var room = home.ensureRoom(typeof answer.room === 'string' ? answer.room : name,
          listed ? { topic: listed.get('topic') } : null);
        room.set('joinedPosition', Math.max(room.get('joinedPosition'), models.toPosition(answer.position) || 0));
        if (home === self.homeModel) {
          self.showConversation(room);
        }
      });
    });

    self.viewEventBus.on('openRoom', function (name) {
      var home = self.homeModel;
      self.showConversation(home && home.room(name));
    });

    self.viewEventBus.on('leaveRoom', function (conversation) {
      var home = self.homeModel;
      if (!home) {
        return;
      }
      var name = conversation.get('name');
      self.chatClient.leaveRoom(name, function (error, answer) {
        if (error) {
          home.set('chatError', errorText(ROOM_ERRORS, error));
        } else {
          home.dropRoom(typeof answer.room === 'string' ? answer.room : name);
        }
      });
    });

    self.viewEventBus.on('reconnect', function () {
      self.chatClient.reconnect();
    });

    // -- view bus: accounts ------------------------------------------------

    self.viewEventBus.on('signIn', function (name, password) {
      self.accountModel.submitted(name);
      ChatApp.auth.signIn(name, password, function (error, session) {
        if (error) {
          self.accountModel.refused(error.message);
        } else {
          self.beginSession(session);
        }
      });
    });

    // Register, then sign in with the same name and password.
    self.viewEventBus.on('register', function (name, password) {
      self.accountModel.submitted(name);
      ChatApp.auth.register(name, password, function (error, answer) {
        if (error) {
          self.accountModel.refused(error.message);
          return;
        }
        var registered = answer && typeof answer.name === 'string' && answer.name ? answer.name : name;
        self.accountModel.set('registering', false);
        ChatApp.auth.signIn(registered, password, function (failure, session) {
          if (failure) {
            self.accountModel.refused('Registered, but could not sign in: ' + failure.message);
          } else {
            self.beginSession(session);
          }
        });
      });
    });

    // Revoke the token on the server; the tab forgets it either way.
    self.viewEventBus.on('signOut', function () {
      var session = self.session;
      self.endSession('You signed out.');
      if (session) {
        ChatApp.auth.signOut(session.token, function () {});
      }
    });

    // -- app bus: connection -------------------------------------------------

    self.appEventBus.on('connected', function () {
      if (self.me) {
        self.connection.set({ state: 'relogin', attempt: 0 });
        self.reloginTries = 0;
        if (self.resumeToken) {
          // The token went with the connection (auth): the server answers
          // welcome {resumed: true} or resumeFailed. Log in plainly if neither comes.
          self.later('resume', RESUME_ANSWER_MS, function () {
            if (self.chatClient.connected()) {
              self.relogin();
            }
          });
        } else {
          self.relogin();
        }
      } else {
        self.connection.set({ state: 'connected', attempt: 0 });
        if (self.pendingLogin !== null) {
          self.chatClient.login(self.pendingLogin);
        }
      }
    });

    self.appEventBus.on('disconnected', function () {
      if (self.mode === 'accounts' && !self.session) {
        return; // signed out: the form shows that
      }
      self.cancel('resume');
      self.cancel('relogin');
      self.connection.set({ state: 'disconnected', name: '' });
      self.dropToken();
      if (self.homeModel && self.homeModel.get('online')) {
        self.homeModel.endSession();
        self.lostNotice = self.homeModel.addNotice('Connection lost.');
      }
    });

    self.appEventBus.on('reconnecting', function (attempt) {
      self.connection.set({ state: 'reconnecting', attempt: attempt });
    });

    self.appEventBus.on('stopped', function () {
      if (self.mode === 'accounts' && !self.session) {
        return;
      }
      if (self.reconnectWhenStopped) {
        self.reconnectWhenStopped = false;
        self.chatClient.reconnect(); // with the refreshed token, resuming the session
        return;
      }
      self.connection.set({ state: 'stopped' });
    });

    // Accounts mode: the handshake was refused (token expired or revoked,
    // name banned). Socket.IO does not retry that; sign in again.
    self.appEventBus.on('refused', function (data) {
      if (self.mode !== 'accounts') {
        return;
      }
      var text = SESSION_ENDS[data.code] || SESSION_ENDS.invalid_token;
      if (data.code === 'banned' && data.message) {
        text = SESSION_ENDS.banned + ' (' + data.message + ')';
      }
      self.endSession(text);
    });

    // -- app bus: login ----------------------------------------------------

    self.appEventBus.on('welcome', function (data) {
      self.cancel('resume');
      self.cancel('relogin');
      if (typeof data.resumeToken === 'string' && data.resumeToken) {
        self.resumeToken = data.resumeToken;
      }
      var reconnected = false;
      if (self.pendingLogin !== null) {
        self.me = typeof data.name === 'string' ? data.name : self.pendingLogin;
        self.pendingLogin = null;
        self.autoLoginTries = 0;
        self.cancel('autologin');
        if (self.mode !== 'accounts') {
          savedName.set(self.me);
        }
        self.loginModel.set({ busy: false, error: '' });
        self.showHome();
      } else if (self.me) {
        reconnected = true;
      } else {
        return; // not asked for
      }
      self.homeModel.startSession(_.extend({}, data, { name: self.me }));
      if (reconnected && data.resumed) {
        // The server replays everything missed: nothing was lost after all.
        self.homeModel.chats.remove(self.lostNotice);
      } else if (reconnected) {
        // History fills in what it can, above this line.
        self.homeModel.addNotice('Reconnected: logged in again as ' + self.me + '.');
      }
      self.lostNotice = null;
      self.connection.set({ state: 'connected', name: self.me });
      self.chatClient.requestOnlineUsers();
      if (self.tokenWanted) {
        self.fetchToken(); // a new session: its own token
      }
      if (reconnected && !data.resumed) {
        // What rooms and PMs missed is not replayed: load them again.
        self.homeModel.forgetConversations();
      }
      self.loadConversation(self.homeModel, self.homeModel.activeConversation());
    });

    self.appEventBus.on('loginNameBad', function () {
      if (self.pendingLogin !== null) {
        self.pendingLogin = null;
        self.autoLoginTries = 0;
        savedName.clear();
        self.loginRefused('Invalid name');
      } else if (self.me) {
        self.loggedOut('Invalid name');
      }
    });

    self.appEventBus.on('loginNameExists', function () {
      if (self.pendingLogin !== null && self.autoLoginTries > 0 && self.autoLoginTries < AUTO_LOGIN_TRIES) {
        // Reloaded: most likely our previous page's socket, about to go.
        self.autoLoginTries += 1;
        self.later('autologin', AUTO_LOGIN_RETRY_MS, function () {
          if (self.pendingLogin !== null && self.chatClient.connected()) {
            self.chatClient.login(self.pendingLogin);
          }
        });
      } else if (self.pendingLogin !== null) {
        self.pendingLogin = null;
        self.autoLoginTries = 0;
        self.loginRefused(self.mode === 'accounts' ? 'This account is signed in elsewhere.' : 'Name already exists');
      } else if (self.me) {
        // Most likely our own previous connection, not yet timed out on the
        // server: try again for a while before giving the name up.
        self.retryRelogin('Name already exists');
      }
    });

    self.appEventBus.on('resumeFailed', function () {
      self.cancel('resume');
      self.resumeToken = null;
      if (self.me && self.chatClient.connected()) {
        self.relogin();
      }
    });

    // Back to the login screen with our name filled in (re-login impossible).
    self.loggedOut = function (error) {
      if (self.mode === 'accounts') {
        self.endSession(error);
        return;
      }
      var name = self.me;
      self.me = null;
      savedName.clear();
      self.resumeToken = null;
      self.homeModel = null;
      self.loginModel.set({ name: name });
      self.connection.set({ state: 'connected', name: '' });
      self.showLogin(error);
    };

    // -- app bus: lobby ----------------------------------------------------

    self.appEventBus.on('usersInfo', function (names) {
      if (self.homeModel) {
        self.homeModel.setOnlineUsers(names);
      }
    });

    self.appEventBus.on('userJoined', function (name, meta) {
      if (self.homeModel) {
        self.homeModel.userJoined(name, meta);
      }
    });

    self.appEventBus.on('userLeft', function (name, meta) {
      if (self.homeModel) {
        self.homeModel.userLeft(name, meta);
      }
    });

    self.appEventBus.on('chatReceived', function (chat) {
      if (self.homeModel) {
        self.homeModel.addChat(chat);
      }
    });

    self.appEventBus.on('conversations', function (summary) {
      if (self.homeModel) {
        self.homeModel.applySummary(summary);
      }
    });

    _.each({ roomCreated: 'created', roomJoined: 'join', roomLeft: 'leave', roomChat: 'chat' }, function (kind, event) {
      self.appEventBus.on(event, function (data) {
        if (self.homeModel) {
          self.homeModel.roomEvent(kind, data);
        }
      });
    });

    self.appEventBus.on('privateMessage', function (data) {
      if (self.homeModel) {
        self.homeModel.privateMessage(data);
      }
    });

    self.appEventBus.on('history', function (history) {
      if (self.homeModel) {
        self.homeModel.mergeHistory(history);
      }
    });

    self.appEventBus.on('protocolError', function (error) {
      if (self.mode === 'accounts' && error.code === 'token_expired' && self.session &&
          self.session.expiresAt - Date.now() > FRESH_ENOUGH_MS) {
        // The connection's token ran out but a refreshed one is here: the
        // server closes this connection; open a new one with the new token.
        self.reconnectWhenStopped = true;
        return;
      }
      if (self.mode === 'accounts' && SESSION_ENDS[error.code]) {
        self.endSession(SESSION_ENDS[error.code]);
        return;
      }
      if (error.event === 'login' && error.code !== 'already_logged_in') {
        // Refused for another reason than the name (e.g. server_error).
        if (self.pendingLogin !== null) {
          self.pendingLogin = null;
          self.loginRefused(error.message || 'Could not log in: try again.');
        } else if (self.me) {
          self.retryRelogin(error.message || 'Could not log in again.');
        }
        return;
      }
      // Chat refusals are shown from the chat's acknowledgement; the rest are
      // races around reconnecting (e.g. a chat sent just before a drop).
      if (window.console && error.event !== 'chat') {
        window.console.warn('chat server refused', error.event, error.code, error.message);
      }
    });
  };

  ChatApp.MainController = MainController;
})(ChatApp, Backbone, _);
