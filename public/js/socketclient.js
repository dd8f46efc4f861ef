/*
 * The Socket.IO client: the only module that knows the wire protocol. It
 * turns server events into events on the application bus (`vent`) and
 * offers methods for what the client sends.
 *
 * Bus events: connected, disconnected(reason), reconnecting(attempt),
 * stopped (the server closed the connection; no automatic reconnect),
 * refused(data) (accounts mode: the server refused the handshake,
 * data {code, message}; Socket.IO does not retry that by itself),
 * welcome(data), loginNameBad(name), loginNameExists(name),
 * usersInfo(names), userJoined(name, meta), userLeft(name, meta),
 * chatReceived(chat), history(history), resumeFailed(error),
 * protocolError(error); rooms and private messages: conversations(summary),
 * roomCreated(data), roomJoined(data), roomLeft(data), roomChat(data),
 * privateMessage(data).
 */
(function (ChatApp, _, io) {
  'use strict';

  var ANSWER_TIMEOUT_MS = 10000;

  var ChatClient = function (options) {
    this.vent = options.vent;
    this.url = options.url; // undefined: the server that served this page
    // function () -> {resumeToken, lastPosition} or null; asked on every (re)connect
    this.resumeState = options.resumeState || function () { return null; };
    // function () -> the access token (accounts mode) or null; asked on every (re)connect
    this.token = options.token || function () { return null; };
    this.socket = null;
  };

  _.extend(ChatClient.prototype, {
    connect: function () {
      var self = this;
      var options = {
        // WebSocket first (no long-poll left hanging when a tab closes);
        // long-polling only if WebSocket cannot connect.
        transports: ['websocket', 'polling'],
        tryAllTransports: true,
        closeOnBeforeunload: true,
        reconnectionDelay: 500,
        reconnectionDelayMax: 3000,
        // A function, so every reconnect sends the latest tokens and position
        // (an access token refreshed since the last connect, too).
        auth: function (cb) {
          var state = self.resumeState();
          var token = self.token();
          var auth = state && state.resumeToken ? _.clone(state) : {};
          if (token) {
            auth.token = token;
          }
          cb(auth);
        }
      };
      this.socket = this.url ? io(this.url, options) : io(options);
      this.listen(this.socket);
    },

    // Reconnect after the server closed the connection (no automatic retry then).
    reconnect: function () {
      if (this.socket && !this.socket.connected) {
        this.socket.connect();
      }
    },

    // Close the connection for good (signing out); reconnect() opens it again.
    disconnect: function () {
      if (this.socket) {
        this.socket.disconnect();
      }
    },

    connected: function () {
      return !!(this.socket && this.socket.connected);
    },

    login: function (name) {
      this.socket.emit('login', name);
    },

    // Emit `event` with `args` and call cb(error, answer) with the ack:
    // error {code, message} for a refusal ({ok: false}) or no answer in time.
    request: function (event, args, cb) {
      var socket = this.socket.timeout(ANSWER_TIMEOUT_MS);
      socket.emit.apply(socket, [event].concat(args, [function (err, ack) {
        if (err) {
          cb({ code: 'timeout', message: 'No answer from the server.' });
        } else if (!_.isObject(ack) || ack.ok === false) {
          cb({ code: (ack && ack.error) || 'bad_answer', message: (ack && ack.message) || 'The server refused.' });
        } else {
          cb(null, ack);
        }
      }]));
    },

    // cb(error) once the server stored the chat or refused it. `target`:
    // null for the lobby (the seed's one-argument chat), {room} or {to};
    // `attachments`: ids of uploads to post with it (the text may then be '').
    chat: function (text, cb, target, attachments) {
      var options = target ? _.clone(target) : null;
      if (attachments && attachments.length) {
        options = _.extend(options || {}, { attachments: attachments });
      }
      this.request('chat', options ? [text, options] : [text], function (error, ack) {
        if (error && error.code === 'timeout') {
          error.message = 'No answer from the server; the message may not have been sent.';
        }
        cb(error, ack);
      });
    },

    // cb(error, {token, expiresIn}): the session's token for /api/uploads and /files.
    uploadToken: function (cb) {
      this.request('uploadToken', [], function (error, answer) {
        if (!error && (typeof answer.token !== 'string' || !answer.token)) {
          error = { code: 'bad_answer', message: 'No upload token in the answer.' };
        }
        cb(error, error ? null : answer);
      });
    },

    // Accounts mode: hand the connection a refreshed access token, so the
    // session outlives the token it connected with. cb(error, {expiresIn}).
    reauth: function (token, cb) {
      this.request('reauth', [{ token: token }], cb);
    },

    requestOnlineUsers: function () {
      this.socket.emit('onlineUsers');
    },

    // cb(error, {items, reachedStart}): `query` is {before?, limit?, room?, with?}.
    history: function (query, cb) {
      this.request('history', [query], function (error, page) {
        if (!error && !_.isArray(page.items)) {
          error = { code: 'bad_answer', message: 'History is not available.' };
        }
        cb(error, error ? null : page);
      });
    },

    createRoom: function (room, topic, cb) {
      this.request('createRoom', [{ room: room, topic: topic }], cb);
    },

    joinRoom: function (room, cb) {
      this.request('joinRoom', [{ room: room }], cb);
    },

    leaveRoom: function (room, cb) {
      this.request('leaveRoom', [{ room: room }], cb);
    },

    // cb(error, {rooms, more}): the rooms after `after` (a name) in name order.
    listRooms: function (after, cb) {
      this.request('listRooms', [after ? { after: after } : {}], cb);
    },

    roomMembers: function (room, cb) {
      this.request('roomMembers', [{ room: room }], cb);
    },

    // `scope` is {room} or {with}.
    markRead: function (scope, position, cb) {
      this.request('markRead', [_.extend({ position: position }, scope)], cb || function () {});
    },

    listen: function (socket) {
      var vent = this.vent;
      var manager = socket.io;

      socket.on('connect', function () { vent.trigger('connected'); });
      socket.on('disconnect', function (reason) {
        vent.trigger('disconnected', reason);
        if (reason === 'io server disconnect') {
          vent.trigger('stopped', reason); // Socket.IO does not reconnect by itself here
        }
      });
      // A refusal by the server (its middleware) carries data {code, message};
      // a transport failure does not, and Socket.IO retries that itself.
      // (socket.active is false after a refusal: no retry is scheduled.)
      socket.on('connect_error', function (error) {
        if (!error || socket.active) {
          return;
        }
        var data = _.isObject(error.data) ? error.data : {};
        var text = String(data.message || error.message || '');
        var named = /\b(auth_required|invalid_token|expired_token|banned)\b/.exec(text);
        vent.trigger('refused', { code: String(data.code || (named && named[1]) || 'refused'), message: text });
      });
      manager.on('reconnect_attempt', function (attempt) { vent.trigger('reconnecting', attempt); });

      socket.on('welcome', function (data) {
        vent.trigger('welcome', _.isObject(data) ? data : {});
      });
      socket.on('loginNameBad', function (name) { vent.trigger('loginNameBad', name); });
      socket.on('loginNameExists', function (name) { vent.trigger('loginNameExists', name); });
      socket.on('onlineUsers', function (names) {
        if (_.isArray(names)) {
          vent.trigger('usersInfo', _.map(names, String));
        }
      });
      // The seed sends a bare name; a later server may add {position, time}
      // as a second argument.
      socket.on('userJoined', function (name, meta) {
        vent.trigger('userJoined', String(name), _.isObject(meta) ? meta : null);
      });
      socket.on('userLeft', function (name, meta) {
        vent.trigger('userLeft', String(name), _.isObject(meta) ? meta : null);
      });
      socket.on('chat', function (chat) {
        if (_.isObject(chat)) {
          vent.trigger('chatReceived', chat);
        }
      });
      socket.on('history', function (history) {
        if (_.isObject(history)) {
          vent.trigger('history', history);
        }
      });
      _.each(['conversations', 'roomCreated', 'roomJoined', 'roomLeft', 'roomChat', 'privateMessage'], function (name) {
        socket.on(name, function (data) {
          if (_.isObject(data)) {
            vent.trigger(name, data);
          }
        });
      });
      socket.on('resumeFailed', function (error) {
        vent.trigger('resumeFailed', _.isObject(error) ? error : {});
      });
      socket.on('protocolError', function (error) {
        vent.trigger('protocolError', _.isObject(error) ? error : {});
      });
    }
  });

  ChatApp.ChatClient = ChatClient;
})(ChatApp, _, io);
