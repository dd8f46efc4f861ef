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

  var CHAT_ERRORS = {
    empty_message: 'Empty messages are not sent.',
    rate_limited: 'Too many messages: slow down.',
    not_logged_in: 'Not logged in yet: try again in a moment.',
    not_stored: 'The server could not store the message: try again.'
  };

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
      self.showLogin('');

      self.chatClient = new ChatApp.ChatClient({
        vent: self.appEventBus,
        url: options.url,
        resumeState: function () {
          if (!self.me || !self.resumeToken || !self.homeModel) {
            return null;
          }
          return { resumeToken: self.resumeToken, lastPosition: self.homeModel.horizon };
        }
      });
      self.chatClient.connect();

      if (saved) {
        self.autoLoginTries = 1;
        self.viewEventBus.trigger('login', saved);
      }
    };

    self.showLogin = function (error) {
      self.loginModel.set({ error: error, busy: false });
      self.containerModel.set('viewState', new views.LoginView({ vent: self.viewEventBus, model: self.loginModel }));
    };

    self.showHome = function () {
      self.homeModel = new models.HomeModel();
      self.homeView = new views.HomeView({ vent: self.viewEventBus, model: self.homeModel });
      self.containerModel.set('viewState', self.homeView);
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

    self.viewEventBus.on('chat', function (text) {
      self.chatClient.chat(text, function (error) {
        if (!error || !self.homeModel) {
          return;
        }
        var message = CHAT_ERRORS[error.code] || error.message || error.code;
        self.homeModel.set('chatError', message);
        if (error.code !== 'timeout') {
          self.homeModel.trigger('unsent', text); // refused, so certainly not sent: give it back
        }
      });
    });

    self.viewEventBus.on('loadOlder', function () {
      var home = self.homeModel;
      var before = home && home.chats.firstPosition();
      if (!home || before === undefined) {
        return;
      }
      home.set('loadingOlder', true);
      self.chatClient.olderHistory(before, HISTORY_PAGE, function (error, page) {
        if (error) {
          home.set({ loadingOlder: false, chatError: 'Could not load earlier messages: ' + error.message });
        } else {
          home.prependOlder(page);
        }
      });
    });

    self.viewEventBus.on('reconnect', function () {
      self.chatClient.reconnect();
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
      self.cancel('resume');
      self.cancel('relogin');
      self.connection.set({ state: 'disconnected', name: '' });
      if (self.homeModel && self.homeModel.get('online')) {
        self.homeModel.endSession();
        self.lostNotice = self.homeModel.addNotice('Connection lost.');
      }
    });

    self.appEventBus.on('reconnecting', function (attempt) {
      self.connection.set({ state: 'reconnecting', attempt: attempt });
    });

    self.appEventBus.on('stopped', function () {
      self.connection.set({ state: 'stopped' });
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
        savedName.set(self.me);
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
    });

    self.appEventBus.on('loginNameBad', function () {
      if (self.pendingLogin !== null) {
        self.pendingLogin = null;
        self.autoLoginTries = 0;
        savedName.clear();
        self.loginModel.refused('Invalid name');
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
        self.loginModel.refused('Name already exists');
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

    self.appEventBus.on('history', function (history) {
      if (self.homeModel) {
        self.homeModel.mergeHistory(history);
      }
    });

    self.appEventBus.on('protocolError', function (error) {
      if (error.event === 'login' && error.code !== 'already_logged_in') {
        // Refused for another reason than the name (e.g. server_error).
        if (self.pendingLogin !== null) {
          self.pendingLogin = null;
          self.loginModel.refused(error.message || 'Could not log in: try again.');
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
